"""Server-side checks on incoming updates: a malformed or unexpected update is rejected with a reason, the round
goes on with the rest.

Rules, in order: the update answers the current round (not stale, not replayed); it comes from a client of the
federation that was asked this round; its ``num_examples`` is positive and at most the configured cap; its tensor
names are exactly the global adapter's (less its frozen LoRA residuals, which are never uploaded); every tensor has
the global shape, dtype float32 (the wire format of deltas) and finite values; its algorithm extras are finite
float tensors; and it is the first update of that client this round.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlm.aggregation.lora_structure import without_residuals
from fedlm.core.errors import FedlmError
from fedlm.core.update import ClientFailure, ClientUpdate

WIRE_DTYPE = torch.float32


@dataclass(frozen=True)
class Expectations:
    """What the server expects of this round's updates.

    Attributes:
        round: The current round.
        tensors: The global adapter tensors (names and shapes every update must match).
        clients: The clients asked this round (None: anyone of ``federation``).
        federation: Every client of the federation (None: not checked).
        max_num_examples: The cap on ``num_examples`` (None: no cap).
    """

    round: int
    tensors: Mapping[str, torch.Tensor]
    clients: Collection[str] | None = None
    federation: Collection[str] | None = None
    max_num_examples: int | None = None


def update_problem(update: ClientUpdate, expect: Expectations) -> str | None:
    """Why ``update`` cannot be aggregated this round, or None if it can."""
    if update.round != expect.round:
        return f"update is for round {update.round}, the server is at round {expect.round} (stale or replayed)"
    if expect.federation is not None and update.client_id not in expect.federation:
        return f"client {update.client_id!r} is not part of the federation"
    if expect.clients is not None and update.client_id not in expect.clients:
        return f"client {update.client_id!r} was not asked to train in round {expect.round}"
    if update.num_examples <= 0:
        return f"num_examples must be positive, got {update.num_examples}"
    if expect.max_num_examples is not None and update.num_examples > expect.max_num_examples:
        return f"num_examples {update.num_examples} is above the cap `federation.max_num_examples` ({expect.max_num_examples})"
    return _tensor_problem(update, expect.tensors)


def _tensor_problem(update: ClientUpdate, expected: Mapping[str, torch.Tensor]) -> str | None:
    expected = without_residuals(expected)  # a frozen LoRA residual is downloaded, never trained or uploaded
    names, wanted = set(update.tensors), set(expected)
    if names != wanted:
        missing, extra = sorted(wanted - names), sorted(names - wanted)
        return f"tensor names differ from the global model (missing {missing[:3]}, extra {extra[:3]})"
    for name, tensor in update.tensors.items():
        if not isinstance(tensor, torch.Tensor):
            return f"tensor {name} is a {type(tensor).__name__}, not a tensor"
        if tuple(tensor.shape) != tuple(expected[name].shape):
            return f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
        if tensor.dtype != WIRE_DTYPE:
            return f"tensor {name} has dtype {tensor.dtype}, expected {WIRE_DTYPE}"
        if not bool(torch.isfinite(tensor).all()):
            return f"tensor {name} holds NaN or Inf"
    for name, tensor in update.extras.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            return f"extra tensor {name} is not a finite floating-point tensor"
    return None


def split_valid(updates: Sequence[ClientUpdate], expect: Expectations) -> tuple[list[ClientUpdate], list[ClientFailure]]:
    """Accepted updates (the first valid one per client) and rejections with their reasons."""
    accepted: list[ClientUpdate] = []
    rejected: list[ClientFailure] = []
    seen: set[str] = set()
    for update in updates:
        problem = update_problem(update, expect)
        if problem is None and update.client_id in seen:
            problem = "a second update from this client in the same round"
        if problem is None:
            accepted.append(update)
            seen.add(update.client_id)
        else:
            rejected.append(ClientFailure(update.client_id, expect.round, f"rejected: {problem}"))
    return accepted, rejected


@dataclass(frozen=True)
class RoundValidator:
    """Sorts a round's results into accepted updates and failures; refuses a round in which every client that
    replied failed (a broken setup, not bad luck)."""

    federation: Collection[str]
    max_num_examples: int | None = None

    def split(
        self, results: Sequence[ClientUpdate | ClientFailure], state: Mapping[str, torch.Tensor], chosen: Collection[str], round_num: int
    ) -> tuple[list[ClientUpdate], list[ClientFailure]]:
        """(accepted updates, failures and rejections) of ``results``."""
        updates = [r for r in results if isinstance(r, ClientUpdate)]
        failures = [r for r in results if isinstance(r, ClientFailure)]
        accepted, rejected = split_valid(updates, Expectations(round_num, state, set(chosen), set(self.federation), self.max_num_examples))
        failures += rejected
        if not accepted and failures and not all(f.unreachable for f in failures):
            raise FedlmError(f"round {round_num}: no client produced a usable update; first reason: {failures[0].reason}")
        return accepted, failures
