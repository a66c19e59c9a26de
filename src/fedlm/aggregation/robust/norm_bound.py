"""Norm bounding: clip every client update to a fixed L2 norm, then average.

Sun, Kairouz, Suresh & McMahan 2019, "Can You Really Backdoor Federated Learning?" (arXiv:1911.07963), Sec. 4
("norm thresholding of updates"): with threshold M the server uses

    Delta_k' = Delta_k * min(1, M / ||Delta_k||),   w_{t+1} = w_t + server_lr * sum_k p_k Delta_k',

p_k = n_k / n (example weights, as FedAvg). The norm ||Delta_k|| is measured on ``geometry.distance_view`` (for
LoRA: the product changes ΔW = B·A per module, over all modules and other tensors together), and the factor
scales the client's raw delta, every tensor of it. Under ``exact`` (the delta is already a product) and ``ffa``
(ΔW = dB A is linear in dB) the product change then scales by exactly that factor. Under ``naive`` it does not:
scaling (dA, dB) by s changes the product by s B dA + s dB A + s² dB dA, so the clipped product change is about s
times the original (exactly s to first order, smaller by the s² term), hence at most about M.

``AggregationResult.client_weights`` holds each client's effective weight p_k * min(1, M / ||Delta_k||).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch
from pydantic import Field

from fedlm.aggregation.base import register_aggregator
from fedlm.aggregation.robust.geometry import RobustAggregator, RobustDelta, RobustParams, distance_view, norms, scaled
from fedlm.aggregation.weights import example_weights, weighted_sum
from fedlm.core.update import ClientUpdate, TensorDict


def clip_factors(update_norms: Sequence[float], max_norm: float) -> list[float]:
    """min(1, M / ||Delta_k||) per client (1 for a zero update)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    return [1.0 if n <= max_norm else max_norm / n for n in update_norms]


def norm_bounded_mean(
    tensors: Sequence[Mapping[str, torch.Tensor]], update_norms: Sequence[float], num_examples: Sequence[int], max_norm: float
) -> TensorDict:
    """sum_k p_k min(1, M / ||Delta_k||) Delta_k (float32), the norms given (e.g. measured on LoRA products)."""
    factors = clip_factors(update_norms, max_norm)
    return weighted_sum([scaled(t, s) for t, s in zip(tensors, factors)], example_weights(num_examples))


@register_aggregator("norm_bound")
class NormBound(RobustAggregator):
    """Clip each client delta to L2 norm ``max_norm``, then average with example weights; stateless."""

    class Params(RobustParams):
        """The norm threshold M (Sun et al. 2019 tune it to the norms of benign updates)."""

        max_norm: float = Field(1.0, gt=0, allow_inf_nan=False, description="M, the largest L2 norm a client delta keeps")

    params: NormBound.Params
    # K identical updates Delta give w + server_lr * clip(Delta), which is w + Delta only while ||Delta|| <= M.
    returns_mean_update = False

    def robust_delta(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> RobustDelta:
        update_norms = norms([distance_view(global_params, u.tensors) for u in updates]).tolist()
        factors = clip_factors(update_norms, self.params.max_norm)
        sizes = [u.num_examples for u in updates]
        weights = example_weights(sizes)
        delta = norm_bounded_mean([u.tensors for u in updates], update_norms, sizes, self.params.max_norm)
        metrics = {
            "num_selected": float(len(updates)),
            "num_clipped": float(sum(s < 1.0 for s in factors)),
            "update_norm_max": max(update_norms),
            "update_norm_median": statistics.median(update_norms),
        }
        effective = {u.client_id: p * s for u, p, s in zip(updates, weights, factors)}
        return RobustDelta(delta, metrics=metrics, client_weights=effective)
