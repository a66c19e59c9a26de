"""Server-side checks on incoming updates: a malformed update is rejected with a reason, the round goes on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlm.federation.update import ClientFailure, ClientUpdate


def update_problem(update: ClientUpdate, expected: Mapping[str, torch.Tensor], round_num: int) -> str | None:
    """Why ``update`` cannot be aggregated this round, or None if it can."""
    if update.round != round_num:
        return f"update is for round {update.round}, the server is at round {round_num}"
    if update.num_examples <= 0:
        return f"num_examples must be positive, got {update.num_examples}"
    names, wanted = set(update.tensors), set(expected)
    if names != wanted:
        missing, extra = sorted(wanted - names), sorted(names - wanted)
        return f"tensor names differ from the global model (missing {missing[:3]}, extra {extra[:3]})"
    for name, tensor in update.tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            return f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
        if not tensor.is_floating_point():
            return f"tensor {name} has dtype {tensor.dtype}, expected a floating-point dtype"
        if not bool(torch.isfinite(tensor).all()):
            return f"tensor {name} holds NaN or Inf"
    for name, tensor in update.extras.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            return f"extra tensor {name} is not a finite floating-point tensor"
    return None


def split_valid(
    updates: Sequence[ClientUpdate], expected: Mapping[str, torch.Tensor], round_num: int
) -> tuple[list[ClientUpdate], list[ClientFailure]]:
    """Accepted updates (the first per client) and rejections with their reasons."""
    accepted: list[ClientUpdate] = []
    rejected: list[ClientFailure] = []
    seen: set[str] = set()
    for update in updates:
        problem = update_problem(update, expected, round_num)
        if problem is None and update.client_id in seen:
            problem = "a second update from this client in the same round"
        if problem is None:
            accepted.append(update)
            seen.add(update.client_id)
        else:
            rejected.append(ClientFailure(update.client_id, round_num, f"rejected: {problem}"))
    return accepted, rejected
