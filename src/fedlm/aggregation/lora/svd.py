"""Truncated SVD of a LoRA product back into factors (FlexLoRA, Bai et al. 2024, Sec. 3.2).

A dense update W (d_out, d_in) is written as U S V^T; its best rank-r approximation in Frobenius norm
(Eckart-Young) is split evenly into LoRA factors B = U_r S_r^{1/2} (d_out, r) and A = S_r^{1/2} V_r^T (r, d_in),
so that B A = U_r S_r V_r^T and components come ordered by singular value (so cutting to a client's smaller rank
keeps its best approximation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Factorisation:
    """LoRA factors of a dense matrix and what the truncation left out."""

    b: torch.Tensor  # (d_out, r)
    a: torch.Tensor  # (r, d_in)
    singular_values: torch.Tensor  # (min(d_out, d_in),), all of them
    residual_sq: float  # ||W - B A||_F^2
    total_sq: float  # ||W||_F^2


def factorise(weight: torch.Tensor, rank: int) -> Factorisation:
    """Best rank-``rank`` LoRA factors of ``weight`` (float64 SVD for accuracy, factors in float32)."""
    u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)  # (o, m), (m,), (m, i)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(weight.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, weight.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    residual = float((s[k:] ** 2).sum())
    total = float((s**2).sum())
    return Factorisation(b.to(torch.float32), a.to(torch.float32), s.to(torch.float32), residual, total)


def relative_error(residual_sq: float, total_sq: float) -> float:
    """sqrt(residual / total), 0 for an all-zero matrix."""
    return (residual_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
