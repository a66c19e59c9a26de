"""The LoRA aggregation mode (``aggregation.lora``): in which space the server combines client updates.

A mode sits between the server loop and the aggregator. It decides what each client downloads (the global adapter
cut to the client's rank), maps the round's updates into the space where the aggregator's math runs, and maps the
aggregator's result back to adapter tensors. The aggregators (FedAvg, FedAdam, ...) never know about LoRA.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from fedlm.aggregation.lora_structure import lora_pairs, truncate_to_rank
from fedlm.core.registry import Registry
from fedlm.core.update import ClientUpdate, TensorDict


class LoraMode(ABC):
    """Base of the LoRA aggregation modes.

    Args:
        initial_state: The adapter's trainable tensors at initialisation (shared by every client).
        full_rank: The global LoRA rank ``peft.r``; client ranks are at most this.
    """

    name: ClassVar[str]
    #: Which parameter space the aggregator works in (written in the report).
    space: ClassVar[str]
    #: Why the server needs each client's own update (None: the sum of what clients upload is enough); such a mode
    #: cannot run under secure aggregation.
    needs_each_update: ClassVar[str | None] = None
    #: Whether the aggregator works on the adapter's own tensors, the same ones every round; an aggregator that keeps
    #: per-tensor state on the factors (SCAFFOLD's control variates) needs it.
    factor_space: ClassVar[bool] = True
    #: Whether the global state carries a frozen residual per module (:mod:`fedlm.models.residual`).
    keeps_residual: ClassVar[bool] = False
    #: What clients compute with beyond their trainable adapter tensors (None: nothing); data-parallel client
    #: processes copy only those tensors, so such a mode runs with one process per client.
    client_extra: ClassVar[str | None] = None
    #: Why clients of different ranks (``peft.client_ranks``) do not fit the mode (None: they do).
    refuses_client_ranks: ClassVar[str | None] = None

    def __init__(self, initial_state: Mapping[str, torch.Tensor], full_rank: int) -> None:
        self.initial_state = dict(initial_state)
        self.full_rank = full_rank

    def begin_round(self, round_num: int) -> None:
        """Called once per round before the clients' tasks are built (default: nothing)."""

    def frozen_factor(self, round_num: int) -> str | None:
        """The LoRA factor ("A" or "B") clients keep fixed in round ``round_num`` (default: None, both train)."""
        return None

    def download(self, state: Mapping[str, torch.Tensor], rank: int | None) -> TensorDict:
        """The adapter a client of ``rank`` starts from: the global one with components beyond its rank zeroed."""
        return truncate_to_rank(state, rank)

    def to_server_space(
        self,
        state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        starts: Mapping[str, Mapping[str, torch.Tensor]],
        ranks: Mapping[str, int | None],
    ) -> tuple[TensorDict, list[ClientUpdate]]:
        """The global parameters and the updates (deltas) in the aggregator's space.

        ``starts`` is what each client downloaded this round; ``ranks`` each client's rank (None: full). The
        default is the identity: the aggregator works on the adapter tensors themselves.
        """
        return dict(state), list(updates)

    def from_server_space(self, params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> tuple[TensorDict, dict[str, float]]:
        """The next global adapter tensors from the aggregator's result, and what to log about the mapping
        (default: the result as it is, nothing to log)."""
        return dict(params), {}


LORA_MODES: Registry[type[LoraMode]] = Registry(
    "LoRA aggregation mode",
    "aggregation.lora",
    builtin=[f"fedlm.aggregation.lora.{name}" for name in ("naive", "exact", "ffa", "fedex", "flora", "rolora")],
)
"""Every LoRA mode by its ``aggregation.lora`` name; each mode's module registers its class."""


def register_lora_mode(cls: type[LoraMode]) -> type[LoraMode]:
    """Class decorator: make ``cls`` available as ``aggregation.lora: <cls.name>``."""
    return LORA_MODES.register(cls.name, cls)


def truncation_error(state: Mapping[str, torch.Tensor], rank: int | None) -> float:
    """||W - W_r||_F / ||W||_F over all LoRA modules, W = B A and W_r its first ``rank`` components.

    The error a client of rank ``rank`` makes by starting from the cut global adapter (0 for a full-rank client).
    """
    if rank is None:
        return 0.0
    pairs, _ = lora_pairs(state)
    lost = total = 0.0
    for pair in pairs:
        b, a = state[pair.b].to(torch.float32), state[pair.a].to(torch.float32)
        if b.shape[1] <= rank:
            total += float((b @ a).square().sum())
            continue
        tail = b[:, rank:] @ a[rank:]  # (d_out, d_in): the part beyond the client's rank
        lost += float(tail.square().sum())
        total += float((b @ a).square().sum())
    return (lost / total) ** 0.5 if total > 0 else 0.0
