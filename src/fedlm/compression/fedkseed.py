"""FedKSeed: federated full-parameter (or adapter) tuning where a client uploads only (seed, scalar) pairs.

Qin, Chen, Ma, Liu, Li & Ding 2024, "Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes" (ICML), Algorithm 1. A fixed pool of K candidate seeds is shared by the
server and every client. Each local step t picks a seed s_t from the pool, draws the perturbation z_t ~ N(0, I) over
all trainable parameters from s_t, and estimates the projected gradient with two forward passes (MeZO's SPSA,
Malladi et al. 2023, Algorithm 1):

    g_t = (L(theta + eps z_t; B_t) - L(theta - eps z_t; B_t)) / (2 eps),      theta <- theta - lr_t g_t z_t.

The client uploads (index of s_t, g_t) per step: K <= 2^15 seeds fit an int16 index, g_t is float32, so a round of
T steps is 6T bytes plus the safetensors header. The server replays the same updates from the global parameters
(:func:`replay`) with the same code in the same order and dtype, so the reconstructed local parameters equal the
client's bit for bit, then aggregates the replayed deltas as usual (FedAvg). Differences from the paper: seeds are
sampled uniformly from the pool (no probability-differentiated sampling), and the server sends the dense global
parameters (its download is counted dense), not the history of pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlm.core.seeding import derive_seed, torch_generator
from fedlm.core.update import TensorDict

SEED_INDEX, GRADIENT, COEFFICIENT = "fedkseed|seed", "fedkseed|grad", "fedkseed|coefficient"


def candidate_seeds(run_seed: int, k: int) -> list[int]:
    """The K seeds every party derives from the run's seed (the same for every round)."""
    return [derive_seed(run_seed, "fedkseed-candidate", i) % 2**62 for i in range(k)]


def perturbation(seed: int, like: Mapping[str, torch.Tensor]) -> TensorDict:
    """z ~ N(0, I) in float32 on the CPU, shaped like ``like``, drawn in sorted-name order from ``seed``."""
    generator = torch_generator(seed)
    return {name: torch.randn(tuple(like[name].shape), generator=generator, dtype=torch.float32) for name in sorted(like)}


def step(theta: Mapping[str, torch.Tensor], z: Mapping[str, torch.Tensor], coefficient: float) -> TensorDict:
    """theta - coefficient * z, in float32 (the one update rule both the client and the server run)."""
    return {name: torch.add(theta[name], z[name], alpha=-coefficient) for name in theta}


def shifted(theta: Mapping[str, torch.Tensor], z: Mapping[str, torch.Tensor], scale: float) -> TensorDict:
    """theta + scale * z (a probe point of the two-point estimate)."""
    return {name: torch.add(theta[name], z[name], alpha=scale) for name in theta}


def as_float32(value: float) -> float:
    """``value`` rounded to float32, as it travels."""
    return float(torch.tensor(value, dtype=torch.float32))


def replay(
    start: Mapping[str, torch.Tensor], seeds: Sequence[int], indices: Sequence[int], grads: Sequence[float], lrs: Sequence[float]
) -> TensorDict:
    """The client's local parameters rebuilt from the global ones and its uploaded (index, g) pairs."""
    theta = {name: t.detach().to(torch.float32).cpu().clone() for name, t in start.items()}
    for index, g, lr in zip(indices, grads, lrs):
        theta = step(theta, perturbation(seeds[index], theta), lr * g)
    return theta


def seedwise_step(state: Mapping[str, torch.Tensor], seeds: Sequence[int], indices: Sequence[int], coefficients: Sequence[float]) -> TensorDict:
    """w - sum_s c_s z_s applied seed by seed in the given order (float32), cast back to ``state``'s dtypes: the
    server's step and every client's replay of the broadcast (index, c_s) list."""
    theta = {name: t.detach().to(torch.float32).cpu().clone() for name, t in state.items()}
    for index, c in zip(indices, coefficients):
        theta = step(theta, perturbation(seeds[index], theta), c)
    return {name: theta[name].to(state[name].dtype) for name in state}
