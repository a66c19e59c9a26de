"""The ``federation``, ``aggregation`` and ``objective`` sections: what a round is, how updates are combined, what
is trained. The aggregator's and the objective's own parameters sit beside their ``name`` and are checked by them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedlm.config.schema.section import Section

_RAY_ADDRESS = r"^(auto|[A-Za-z0-9.\-]+:[0-9]{1,5})$"


class SimulationEngineConfig(Section):
    """Flower's Simulation Engine with its Ray backend (``federation.runtime: flower-simulation``): each client's
    ClientApp runs in a Ray worker that reserves ``num_cpus`` cores and ``num_gpus`` GPUs (Flower's
    ``client_resources``), so as many clients train at once as workers fit on the machine or the Ray cluster."""

    num_cpus: float = Field(1.0, gt=0.0, description="CPU cores each client's Ray worker reserves (and its torch threads)")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs each client's Ray worker reserves; 0.5: two clients share a GPU")
    ray_cpus: int | None = Field(None, ge=1, description="CPU cores Ray may use on this machine (default: all); not with `address`")
    address: str | None = Field(
        None, pattern=_RAY_ADDRESS, description="join a running Ray cluster (`ray start --head`): auto or HOST:PORT; default: start Ray here"
    )
    round_timeout_s: float = Field(3600.0, gt=0.0, description="seconds a round's train messages may take (queued clients included)")


class FedKSeedConfig(Section):
    """FedKSeed's settings (``federation.algorithm: fedkseed``; Qin et al. 2024)."""

    seeds: int = Field(4096, ge=1, le=2**15, description="K: the candidate seeds shared by the server and every client")
    eps: float = Field(1e-3, gt=0.0, allow_inf_nan=False, description="the perturbation scale of the two-point gradient estimate")
    downlink: Literal["seeds", "dense"] = Field(
        "seeds", description="seeds: the server's FedAvg step as (seed, coefficient) lists that clients replay (fedavg only); dense: the global model"
    )


class FederationConfig(Section):
    """What a round is and who runs it."""

    runtime: Literal["simulation", "flower", "flower-simulation"] = Field(
        "simulation",
        description="simulation: in-process; flower: a Flower SuperLink and SuperNodes (`fedlm flower run`); "
        "flower-simulation: the Flower apps on Flower's Simulation Engine (Ray), clients in parallel (`fedlm run`)",
    )
    simulation_engine: SimulationEngineConfig = Field(default_factory=SimulationEngineConfig, description="settings of `runtime: flower-simulation`")
    rounds: int = Field(3, ge=1)
    clients_per_round: int | None = Field(None, ge=1, description="default: every client, every round")
    min_clients: int = Field(1, ge=1, description="fewest valid updates for a round to be aggregated")
    sampling: Literal["uniform", "contribution"] = Field(
        "uniform",
        description="uniform: clients_per_round drawn uniformly; contribution: in proportion to a softmax of their cumulative contribution "
        "scores, with a floor (the `contribution` section)",
    )
    round_retries: int = Field(0, ge=0, description="with fewer than min_clients updates, send the failed clients' tasks again up to this many times")
    retry_wait_s: float = Field(0.0, ge=0.0, description="seconds to wait before each retry (e.g. for a node to restart)")
    max_num_examples: int | None = Field(
        None, ge=1, description="updates claiming more training examples than this are rejected (caps a client's weight)"
    )
    local_steps: int = Field(10, ge=1, description="optimizer steps per client per round")
    algorithm: Literal["gradient", "fedkseed"] = Field(
        "gradient", description="gradient: backprop local steps; fedkseed: zeroth-order steps on K shared seeds, uploading (seed, scalar) pairs"
    )
    fedkseed: FedKSeedConfig = Field(default_factory=FedKSeedConfig)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0.0)
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="local optimizer, fresh every round")
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr / lr for linear and cosine")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    client_processes: int = Field(
        1, ge=1, description="data-parallel processes per client (gloo on CPU, nccl with one GPU each); a step's batch is split among them"
    )
    round_deadline_s: float | None = Field(
        None,
        gt=0.0,
        allow_inf_nan=False,
        description="simulated seconds a synchronous round waits (needs `systems`); late clients are dropped or send partial work (`systems.late_clients`)",
    )
    max_mib: float | None = Field(
        None,
        gt=0.0,
        description="communication budget in MiB (uploads + downloads of every client): the run stops before a round that would exceed it",
    )
    checkpoint_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


class AggregationConfig(BaseModel):
    """The server aggregator by registered name; its own parameters sit beside ``name`` and are checked by it."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = "fedavg"
    lora: Literal["naive", "exact", "ffa", "fedex", "flora", "rolora"] = Field(
        "naive",
        description=(
            "naive: average A and B; exact: average B A and SVD back (FlexLoRA); ffa: frozen A, B only; "
            "fedex: average A and B, fold the missed cross terms into the frozen weight (FedEx-LoRA); "
            "flora: stack the client modules, merge into the frozen weight, restart LoRA each round (FLoRA); "
            "rolora: odd rounds train B, even rounds A, the other frozen (RoLoRA)"
        ),
    )

    def params(self) -> dict[str, Any]:
        """The aggregator's parameters: every key but ``name`` and ``lora``."""
        return dict(self.model_extra or {})


class ObjectiveConfig(BaseModel):
    """The training objective (``sft | clm | dpo``, :mod:`fedlm.objectives`). A bare string in YAML
    (``objective: sft``) means ``{name: sft}``; the objective's own parameters sit beside ``name``
    (``objective: {name: dpo, beta: 0.1}``) and are checked by it at load."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field("sft", description="sft (instruction tuning) | clm (raw text, continued pre-training) | dpo (preference pairs)")

    def params(self) -> dict[str, Any]:
        """The objective's parameters: every key but ``name``."""
        return dict(self.model_extra or {})
