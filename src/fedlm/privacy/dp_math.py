"""The pure maths of client-level DP: flat clipping, Gaussian noise, the noised mean, distributed noise shares and
adaptive clipping (McMahan et al. 2018, Algorithm 1; Andrew et al. 2021, Algorithm 1).

The derivations are in :mod:`fedlm.privacy.client_dp`, whose wrapper composes these functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedlm.aggregation.weights import weighted_sum
from fedlm.core.update import TensorDict

#: Clipping scales to just below C, so float32 rounding of the scaled tensors cannot push the norm above C.
_CLIP_SAFETY = 1.0 - 2.0**-20


def check_finite(tensors: Mapping[str, torch.Tensor], client_id: str) -> None:
    """Raise ValueError naming the client and tensor when an update holds NaN or Inf (never clip or pass it on)."""
    for name in sorted(tensors):
        if not bool(torch.isfinite(tensors[name]).all()):
            raise ValueError(
                f"update of client {client_id!r} has NaN/Inf in tensor {name!r}; differential privacy refuses it "
                "(a non-finite norm cannot be clipped); drop that client's update before aggregation"
            )


def update_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """||Delta||_2 over every tensor of one update together (accumulated in float64)."""
    sq = sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in tensors.values())
    return math.sqrt(sq)


def clip_update(tensors: Mapping[str, torch.Tensor], clip: float, *, client_id: str = "?") -> tuple[TensorDict, float]:
    """Flat clipping (McMahan et al. 2018, Algorithm 1, ClipFn): Delta * min(1, C / ||Delta||), all tensors together.

    Returns new float32 tensors and the pre-clip norm. An update within the bound (a zero update included) comes
    back unchanged; a larger one is scaled to norm C (times 1 - 2^-20, so rounding cannot exceed C).
    Raises ValueError naming ``client_id`` for NaN/Inf, before any clipping.
    """
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be a finite number > 0, got {clip}")
    check_finite(tensors, client_id)
    norm = update_norm(tensors)
    if norm <= clip:
        return {n: t.to(torch.float32).clone() for n, t in tensors.items()}, norm
    factor = clip / norm * _CLIP_SAFETY
    return {n: t.to(torch.float32) * factor for n, t in tensors.items()}, norm


def gaussian_noise_like(tensors: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> TensorDict:
    """N(0, std^2) per coordinate, float32, shaped like each tensor and on its device.

    Drawn on the CPU ``generator`` in sorted-name order, so the noise depends only on the seed, never on the device.
    """
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"noise std must be a finite number >= 0, got {std}")
    out: TensorDict = {}
    for name in sorted(tensors):
        t = tensors[name]
        if std == 0:
            out[name] = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        else:
            out[name] = (std * torch.randn(t.shape, generator=generator, dtype=torch.float32)).to(t.device)
    return out


def noised_mean(
    updates: Sequence[Mapping[str, torch.Tensor]], *, noise_std: float, expected_clients: float, generator: torch.Generator
) -> TensorDict:
    """(sum_k Delta_k + N(0, noise_std^2 I)) / m: the fixed-denominator estimator of McMahan et al. 2018, Alg. 1."""
    if not expected_clients > 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
    total = weighted_sum(updates, [1.0] * len(updates))  # unweighted sum, float32, sorted names
    noise = gaussian_noise_like(total, noise_std, generator)
    return {n: (total[n] + noise[n]) / expected_clients for n in total}


def client_noise_share(
    tensors: Mapping[str, torch.Tensor],
    noise_multiplier: float,
    clip: float,
    num_clients: float,
    generator: torch.Generator,
    *,
    client_id: str = "?",
) -> TensorDict:
    """A client's privatised delta for distributed DP: clip(Delta, C) + N(0, (z C)^2 / K I).

    K such shares sum to noise N(0, (z C)^2 I), the central-DP noise of the sum (module docstring).
    """
    if not num_clients > 0:
        raise ValueError(f"num_clients must be > 0, got {num_clients}")
    clipped, _ = clip_update(tensors, clip, client_id=client_id)
    noise = gaussian_noise_like(clipped, noise_multiplier * clip / math.sqrt(num_clients), generator)
    return {n: clipped[n] + noise[n] for n in clipped}


def adaptive_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Sec. 3); 0 when z = 0.

    Raises ValueError when 2 sigma_b <= z (the count query alone would spend the whole budget).
    """
    if noise_multiplier == 0:
        return 0.0
    if count_noise_std * 2 <= noise_multiplier:
        raise ValueError(
            f"adaptive clipping needs 2 * count_noise_std > noise_multiplier, got count_noise_std {count_noise_std} "
            f"and noise_multiplier {noise_multiplier}; raise count_noise_std (default expected_clients / 20) "
            "or expected_clients, or lower noise_multiplier"
        )
    return (noise_multiplier**-2 - (2.0 * count_noise_std) ** -2) ** -0.5


def noised_unclipped_fraction(
    norms: Sequence[float], clip: float, *, count_noise_std: float, expected_clients: float, generator: torch.Generator
) -> float:
    """b~ = (sum_i 1[||Delta_i|| <= C] + N(0, sigma_b^2)) / m (Andrew et al. 2021, Algorithm 1)."""
    count = float(sum(1 for n in norms if n <= clip))
    noise = count_noise_std * float(torch.randn((), generator=generator, dtype=torch.float64)) if count_noise_std > 0 else 0.0
    return (count + noise) / expected_clients


def geometric_clip_update(clip: float, unclipped_fraction: float, *, target_quantile: float, clip_lr: float) -> float:
    """C <- C * exp(-eta_C (b~ - gamma)) (Andrew et al. 2021, Algorithm 1, geometric update)."""
    return clip * math.exp(-clip_lr * (unclipped_fraction - target_quantile))
