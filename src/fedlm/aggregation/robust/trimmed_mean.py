"""Coordinate-wise beta-trimmed mean of the client updates.

Yin, Chen, Ramchandran & Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates" (ICML), Sec. 3, Option II: per coordinate j the server sorts the K values Delta_k[j], removes the
largest and the smallest beta fraction and averages the rest,

    c = floor(beta K),   Delta_t[j] = 1 / (K - 2c) * sum_{i = c+1}^{K - c} Delta_(i)[j],
    w_{t+1} = w_t + server_lr * Delta_t,

Delta_(i)[j] being the i-th smallest value. Unweighted (a client with num_examples 0 is left out, see
``geometry.py``). beta in [0, 0.5) keeps K - 2c >= 1; beta = 0 is the plain (unweighted) mean.

Against ``flwr.server.strategy.FedTrimmedAvg`` (flwr 1.41, ``aggregate_trimmed_avg`` / ``_trim_mean``, after
``scipy.stats.trim_mean``): ``lowercut = int(beta * K)`` from each end of the local models, mean of the rest,
``num_examples`` ignored. fedlm cuts the same ``int(beta * K)`` (the same float product, so the same count) from
the deltas; trimmed mean(w + Delta_k) = w + trimmed mean(Delta_k). Flower's default beta is 0.2, fedlm's 0.1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import Field

from fedlm.aggregation.base import ByzantineBound, register_aggregator
from fedlm.aggregation.robust.geometry import RobustAggregator, RobustDelta, RobustParams
from fedlm.core.update import ClientUpdate, TensorDict


def trim_count(num_clients: int, beta: float) -> int:
    """How many values are cut from each end: int(beta * K), as Flower's ``_trim_mean`` and scipy's ``trim_mean``."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    return int(beta * num_clients)


def coordinate_trimmed_mean(tensors: Sequence[Mapping[str, torch.Tensor]], beta: float) -> TensorDict:
    """Per coordinate, the mean of the K values without the int(beta K) smallest and largest (float32)."""
    if not tensors:
        raise ValueError("the trimmed mean needs at least one tensor set")
    k = len(tensors)
    cut = trim_count(k, beta)
    out: TensorDict = {}
    for name in sorted(tensors[0]):
        ordered = torch.stack([t[name].to(torch.float32) for t in tensors]).sort(dim=0).values  # (K, *shape)
        out[name] = ordered[cut : k - cut].mean(dim=0)
    return out


@register_aggregator("trimmed_mean")
class TrimmedMean(RobustAggregator):
    """Coordinate-wise beta-trimmed mean of the client deltas; stateless."""

    needs_individual_updates = "it cuts the largest and smallest individual client updates coordinate by coordinate"
    byzantine_bound = ByzantineBound(margin=0, source="an honest majority; Yin et al. 2018")

    class Params(RobustParams):
        """The trimmed fraction (Yin et al. 2018 need beta above the fraction of Byzantine clients)."""

        beta: float = Field(0.1, ge=0, lt=0.5, allow_inf_nan=False, description="fraction cut from each end, in [0, 0.5)")

    params: TrimmedMean.Params

    def robust_delta(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> RobustDelta:
        delta = coordinate_trimmed_mean([u.tensors for u in updates], self.params.beta)
        cut = trim_count(len(updates), self.params.beta)
        return RobustDelta(delta, metrics={"num_selected": float(len(updates) - 2 * cut), "num_trimmed_per_side": float(cut)})
