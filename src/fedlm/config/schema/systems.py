"""The ``systems`` section: heterogeneous devices under a simulated clock (each client's compute speed, bandwidth and
availability), and the server's mode: synchronous rounds (with ``federation.round_deadline_s``) or FedBuff's
asynchronous buffered aggregation (Nguyen et al. 2022)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedlm.config.schema.section import Section


class FedBuffConfig(Section):
    """FedBuff (Nguyen et al. 2022, Algorithm 1): ``concurrency`` clients train at once, each from the global model
    current when it starts; the server steps every ``buffer_size`` arrivals, each update weighted by
    ``(1 + staleness) ** -staleness_exponent`` (0.5: ``1/sqrt(1+staleness)``, the paper's choice)."""

    buffer_size: int = Field(4, ge=1, description="K: arrivals per server step")
    concurrency: int | None = Field(None, ge=1, description="clients training at once (default: `federation.clients_per_round`, else all)")
    staleness_exponent: float = Field(0.5, ge=0.0, allow_inf_nan=False, description="a in the weight (1+staleness)^-a; 0: no staleness weighting")
    max_staleness: int | None = Field(None, ge=0, description="updates staler than this many server steps are left out (default: none)")


class SystemsConfig(Section):
    """Device profiles and the simulated clock (simulation runtime only). A client's round takes
    download / downlink + steps / speed + upload / uplink simulated seconds; a synchronous round lasts as long as its
    slowest participant."""

    profiles: str = Field(
        "seeded",
        description="seeded: speeds drawn from the settings below; or a CSV file with header client,steps_per_s,uplink_mbps,downlink_mbps",
    )
    steps_per_s: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="seeded: the median client's optimizer steps per second")
    speed_sigma: float = Field(0.0, ge=0.0, allow_inf_nan=False, description="seeded: log-normal spread of the clients' speeds")
    slow_clients: int = Field(0, ge=0, description="seeded: how many clients (drawn with the seed) are `slow_factor` times slower")
    slow_factor: float = Field(5.0, ge=1.0, allow_inf_nan=False, description="seeded: how much slower the slow clients are")
    uplink_mbps: float = Field(10.0, gt=0.0, allow_inf_nan=False, description="seeded: every client's upload bandwidth (Mbit/s)")
    downlink_mbps: float = Field(50.0, gt=0.0, allow_inf_nan=False, description="seeded: every client's download bandwidth (Mbit/s)")
    availability: str | None = Field(None, description="a CSV file with header client,start_s,end_s: the simulated windows each client is online")
    available_fraction: float = Field(
        1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="seeded availability: the chance a client is online in each `availability_slot_s` slot"
    )
    availability_slot_s: float = Field(60.0, gt=0.0, allow_inf_nan=False, description="seeded availability: the slot length in simulated seconds")
    late_clients: Literal["drop", "partial"] = Field(
        "drop", description="under `federation.round_deadline_s`: drop a client that would finish late, or take the steps that fit"
    )
    partial_normalisation: Literal["fednova", "none"] = Field(
        "fednova", description="partial work: rescale each update by tau_eff / tau_i (FedNova, Wang et al. 2020), or not"
    )
    mode: Literal["sync", "fedbuff"] = Field("sync", description="sync: rounds; fedbuff: asynchronous buffered aggregation")
    fedbuff: FedBuffConfig = Field(default_factory=FedBuffConfig)

    @model_validator(mode="after")
    def _one_availability(self) -> SystemsConfig:
        if self.availability is not None and self.available_fraction < 1.0:
            raise ValueError("give either `availability` (a CSV trace) or `available_fraction` (a seeded trace), not both")
        return self
