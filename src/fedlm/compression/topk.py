"""Top-k sparsification of one tensor: keep the ``k = ceil(ratio * n)`` entries of largest magnitude.

Stich, Cordonnier & Jaggi 2018, "Sparsified SGD with Memory" (NeurIPS), the top-k operator top_k(x) of Sec. 2; with
error feedback (:mod:`fedlm.compression.feedback`) the dropped mass is kept by the client and added next round.
The message is the kept entries' flat indices (ascending, in the smallest integer type that holds ``n - 1``:
uint8, int16, int32 or int64) and their float32 values.
"""

from __future__ import annotations

import math

import torch


def kept_count(numel: int, ratio: float) -> int:
    """k = ceil(ratio * n), at least 1 for a non-empty tensor."""
    return min(numel, max(1, math.ceil(ratio * numel))) if numel else 0


def index_dtype(numel: int) -> torch.dtype:
    """The smallest integer dtype holding every flat index ``0 .. numel - 1``."""
    if numel <= 2**8:
        return torch.uint8
    if numel <= 2**15:
        return torch.int16
    if numel <= 2**31:
        return torch.int32
    return torch.int64


def topk_encode(tensor: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of the ``kept_count(n, ratio)`` largest-magnitude entries of ``tensor`` (flat, ascending)."""
    flat = tensor.detach().reshape(-1).to(torch.float32)
    k = kept_count(flat.numel(), ratio)
    indices = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    return indices.to(index_dtype(flat.numel())), flat[indices].clone()


def topk_decode(indices: torch.Tensor, values: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The dense float32 tensor of ``shape`` holding ``values`` at the flat ``indices`` and zeros elsewhere."""
    dense = torch.zeros(math.prod(shape), dtype=torch.float32)
    dense[indices.to(torch.int64)] = values.to(torch.float32)
    return dense.reshape(shape)
