"""The ``continual`` section: data that arrives over time (slices of a record field released round by round), clients
that join late and leave, the forgetting measured after every stage, and the mitigations against it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedlm.config.schema.section import Section


class MembershipWindow(Section):
    """The rounds a client takes part in: from ``first`` to ``last`` (both included; default the whole run)."""

    first: int = Field(1, ge=1, description="the first round the client is present")
    last: int | None = Field(None, ge=1, description="the last round the client is present (default: the last round)")

    @model_validator(mode="after")
    def _ordered(self) -> MembershipWindow:
        if self.last is not None and self.last < self.first:
            raise ValueError(f"`last` ({self.last}) is before `first` ({self.first}); a client leaves after it joins")
        return self


class RehearsalConfig(Section):
    """Experience replay from a bounded per-client buffer filled by reservoir sampling (Chaudhry et al. 2019)."""

    buffer_size: int = Field(32, ge=1, description="records of earlier slices each client keeps for replay")


class EWCConfig(Section):
    """Elastic weight consolidation on the adapter parameters (Kirkpatrick et al. 2017), online form (Schwarz et al.
    2018): penalty ``strength / 2 * sum_i F_i (theta_i - theta*_i)^2``."""

    strength: float = Field(100.0, gt=0.0, description="lambda of the EWC penalty")
    samples: int = Field(8, ge=1, description="examples of a client's current slice its diagonal Fisher is estimated on each round")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="decay of the consolidated Fisher at each new slice (online EWC)")


Mitigation = Literal["rehearsal", "ewc"]


class ContinualConfig(Section):
    """Continual federated learning.

    Each record's ``field`` names its slice (a time period or task). ``stream: round`` releases ``slices[k]`` to every
    client at round ``k * rounds_per_slice + 1``; otherwise ``schedule`` gives, per client, the round each slice
    arrives (``{client: {slice: round}}``). A client holds the slices that arrived last (with ``accumulate`` every
    slice that has arrived); ``membership`` limits the rounds a client is present. Sampling draws only from the clients
    present and holding data. After every stage (the rounds up to the next arrival) the global model is evaluated on
    every slice's test records: the accuracy matrix, average forgetting and backward transfer."""

    field: str = Field("domain", description="the record field that names a record's slice (time period or task)")
    slices: list[str] | None = Field(None, description="the slice values in time order (required with `stream: round`)")
    stream: Literal["round"] | None = Field(None, description="`round`: slice k arrives at every client at round k * rounds_per_slice + 1")
    rounds_per_slice: int = Field(1, ge=1, description="with `stream: round`, the rounds each slice is the newest")
    schedule: dict[str, dict[str, int]] | None = Field(None, description="per client: slice -> the round it arrives")
    membership: dict[str, MembershipWindow] = Field(default_factory=dict, description="per client: first and last round present")
    accumulate: bool = Field(False, description="clients keep every slice that has arrived (joint training: an upper bound)")
    mitigations: list[Mitigation] = Field(default_factory=list, description="rehearsal | ewc (either or both)")
    rehearsal: RehearsalConfig = Field(default_factory=RehearsalConfig)
    ewc: EWCConfig = Field(default_factory=EWCConfig)

    @field_validator("schedule", "membership", mode="before")
    @classmethod
    def _client_names_as_strings(cls, value: Any) -> Any:
        """Client names are strings; YAML reads ``0:`` (an iid client) as an int."""
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _one_schedule(self) -> ContinualConfig:
        if (self.stream is None) == (self.schedule is None):
            raise ValueError("`continual` needs exactly one of `stream: round` and `schedule` (per client: slice -> arrival round)")
        if self.stream is not None and not self.slices:
            raise ValueError("`continual.slices` is required with `continual.stream: round`: the slice values in time order")
        if self.slices is not None and len(set(self.slices)) != len(self.slices):
            raise ValueError(f"`continual.slices` names a slice more than once: {self.slices}")
        for client, arrivals in (self.schedule or {}).items():
            if not arrivals:
                raise ValueError(f"`continual.schedule.{client}` is empty; give it at least one slice: round")
            for name, round_num in arrivals.items():
                if round_num < 1:
                    raise ValueError(f"`continual.schedule.{client}.{name}`: rounds start at 1, got {round_num}")
                if self.slices is not None and name not in self.slices:
                    raise ValueError(f"`continual.schedule.{client}` names slice {name!r}, which is not in `continual.slices` {self.slices}")
        if len(set(self.mitigations)) != len(self.mitigations):
            raise ValueError(f"`continual.mitigations` names a mitigation more than once: {self.mitigations}")
        return self
