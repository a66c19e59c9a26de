"""The ``data`` and ``partition`` sections: where the examples come from, and how they are split among clients."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedlm.config.schema.section import Section


class DataConfig(Section):
    """Where the examples come from and how they become token sequences."""

    train: str = Field("embedded:wordnet_defs", description="file, folder, or embedded:<name>")
    test: str | None = Field(None, description="held-out file; without it a seeded split of `train`")
    format: Literal["auto", "alpaca", "messages"] = "auto"
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_length: int = Field(256, ge=8, description="tokens per example; longer ones are cut from the right")
    max_train_examples: int | None = Field(None, ge=1)
    system_prompt: str | None = Field(None, description="system message put before every conversation")


class PartitionConfig(Section):
    """How the training (and test) examples are split among clients; ``node_local``: they are not split, each client's
    SuperNode reads its own ``data.train`` (Flower runtime) and the server holds only ``data.test``."""

    method: Literal["iid", "dirichlet", "by_field", "quantity", "node_local"] = "by_field"
    num_clients: int | None = Field(None, ge=1, description="required for iid, dirichlet and quantity")
    clients: list[str] | None = Field(None, description="node_local: the federation's client names (a SuperNode's partition-id K serves clients[K])")
    field: str | None = "domain"
    alpha: float = Field(0.5, gt=0.0)
    min_examples: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _needs(self) -> PartitionConfig:
        if self.method == "node_local":
            if not self.clients:
                raise ValueError("`partition.clients` is required for `partition.method: node_local`: the federation's client names")
            repeated = sorted({c for c in self.clients if self.clients.count(c) > 1})
            if repeated:
                raise ValueError(f"`partition.clients` names {', '.join(repeated)} more than once")
            if self.num_clients is not None and self.num_clients != len(self.clients):
                raise ValueError(f"`partition.num_clients` ({self.num_clients}) differs from the {len(self.clients)} names in `partition.clients`")
            return self
        if self.clients is not None:
            raise ValueError(f"`partition.clients` is only for `partition.method: node_local` (got method {self.method})")
        if self.method != "by_field" and self.num_clients is None:
            raise ValueError(f"`partition.num_clients` is required for `partition.method: {self.method}`")
        if self.method in ("by_field", "dirichlet") and not self.field:
            raise ValueError(f"`partition.field` is required for `partition.method: {self.method}`")
        return self
