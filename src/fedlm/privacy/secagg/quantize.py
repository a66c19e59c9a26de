"""Fixed-point encoding of updates for secure aggregation: flatten, clip, stochastic quantisation, and back.

Each coordinate x is clipped to [-c, c] and mapped to an integer of [0, L - 1], L = 2^bits, by unbiased stochastic
rounding of (x + c) (L - 1) / (2c) (Bonawitz et al. 2017 and Bell et al. 2020 sum integers modulo R; stochastic
rounding as in Flower's SecAgg+ and Kairouz, Liu & Steinke 2021 keeps the sum unbiased). n clients' integers are
summed modulo R = 2^32; without wrap-around (n (L - 1) < R, checked at config load) the sum decodes exactly to

    sum_k x_k~ = Q (2c) / (L - 1) - n c,      |sum_k x_k~ - sum_k x_k| <= n (2c) / (L - 1)

for inputs inside the range (each stochastic rounding moves a value by less than one step 2c / (L - 1)).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedlm.core.update import TensorDict

MODULUS_BITS = 32


def step(clip_range: float, bits: int) -> float:
    """The quantisation step 2c / (L - 1)."""
    return 2.0 * clip_range / (2**bits - 1)


def sum_error_bound(num_clients: int, clip_range: float, bits: int) -> float:
    """The largest error of a decoded sum of ``num_clients`` in-range inputs, per coordinate."""
    return num_clients * step(clip_range, bits)


def max_summands(bits: int) -> int:
    """How many quantised inputs fit in the modulus 2^32 without wrap-around."""
    return (2**MODULUS_BITS - 1) // (2**bits - 1)


def flatten(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> np.ndarray:
    """The tensors ``names`` (in that order) as one float64 vector."""
    return np.concatenate([tensors[n].detach().to(torch.float64).reshape(-1).cpu().numpy() for n in names]) if names else np.zeros(0)


def unflatten(vector: np.ndarray, like: Mapping[str, torch.Tensor], names: Sequence[str]) -> TensorDict:
    """float32 tensors shaped like ``like[name]`` cut from ``vector`` in ``names`` order."""
    out: TensorDict = {}
    offset = 0
    for name in names:
        ref = like[name]
        size = ref.numel()
        out[name] = torch.from_numpy(np.ascontiguousarray(vector[offset : offset + size])).to(torch.float32).reshape(ref.shape)
        offset += size
    if offset != vector.size:
        raise ValueError(f"vector of {vector.size} values does not match the tensors' {offset}")
    return out


def quantize(vector: np.ndarray, clip_range: float, bits: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """uint32 codes of ``vector`` and how many coordinates were clipped to the range."""
    levels = 2**bits - 1
    clipped = np.clip(vector, -clip_range, clip_range)
    outside = int(np.count_nonzero(clipped != vector))
    scaled = (clipped + clip_range) * (levels / (2.0 * clip_range))
    floor = np.floor(scaled)
    codes = floor + (rng.random(vector.shape) < (scaled - floor))
    return np.minimum(codes, levels).astype(np.uint32), outside


def dequantize_sum(total: np.ndarray, num_clients: int, clip_range: float, bits: int) -> np.ndarray:
    """The float64 sum of ``num_clients`` inputs from the modular sum of their codes."""
    return total.astype(np.float64) * step(clip_range, bits) - num_clients * clip_range
