"""Shared helpers of the aggregation math: client weights and weighted sums of tensor mappings."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedlm.core.update import TensorDict


def example_weights(num_examples: Sequence[int]) -> list[float]:
    """p_k = n_k / sum_j n_j (McMahan et al. 2017, eq. before Algorithm 1)."""
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError("client weights need a positive total number of examples")
    return [n / total for n in num_examples]


def weighted_sum(tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> TensorDict:
    """sum_k w_k * x_k per name, in float32, summed in a fixed (sorted-name) order."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"weighted_sum needs as many weights as tensor sets, got {len(weights)} and {len(tensors)}")
    out: TensorDict = {}
    for name in sorted(tensors[0]):
        acc = torch.zeros_like(tensors[0][name], dtype=torch.float32)
        for t, w in zip(tensors, weights):
            acc.add_(t[name].to(torch.float32), alpha=float(w))
        out[name] = acc
    return out


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm over every tensor of a mapping together (float32)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t.to(torch.float32))) ** 2 for t in tensors.values()))
