"""Coordinate-wise median of the client updates.

Yin, Chen, Ramchandran & Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates" (ICML), Sec. 3, Option I: the server takes, coordinate by coordinate, the median of the K client vectors,

    Delta_t[j] = med{Delta_1[j], ..., Delta_K[j]},   w_{t+1} = w_t + server_lr * Delta_t,

the middle value for odd K and the mean of the two middle values for even K (as ``numpy.median``).
Unweighted: ``num_examples`` does not enter (a client with none is left out, see ``geometry.py``).

Against ``flwr.server.strategy.FedMedian`` (flwr 1.41, ``aggregate_median``): Flower takes ``np.median`` over
the local models w + Delta_k, ignoring ``num_examples``; since med(w + Delta_k) = w + med(Delta_k) coordinate-wise
both give the same model with server_lr = 1. Under the ``exact`` LoRA mode the median is taken in the product
space, under ``naive`` on the factors A and B coordinate by coordinate (a median of factors is no median of
products).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlm.aggregation.base import ByzantineBound, register_aggregator
from fedlm.aggregation.robust.geometry import RobustAggregator, RobustDelta, RobustParams
from fedlm.core.update import ClientUpdate, TensorDict


def coordinate_median(tensors: Sequence[Mapping[str, torch.Tensor]]) -> TensorDict:
    """The coordinate-wise median of K tensor mappings (mean of the two middle values for even K), float32."""
    if not tensors:
        raise ValueError("the median needs at least one tensor set")
    k = len(tensors)
    out: TensorDict = {}
    for name in sorted(tensors[0]):
        ordered = torch.stack([t[name].to(torch.float32) for t in tensors]).sort(dim=0).values  # (K, *shape)
        out[name] = ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
    return out


@register_aggregator("median")
class Median(RobustAggregator):
    """Coordinate-wise median of the client deltas; stateless."""

    needs_individual_updates = "it takes the coordinate-wise median of the individual client updates"
    byzantine_bound = ByzantineBound(margin=0, source="an honest majority; Yin et al. 2018")

    class Params(RobustParams):
        """The median has no parameter of its own."""

    def robust_delta(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> RobustDelta:
        delta = coordinate_median([u.tensors for u in updates])
        return RobustDelta(delta, metrics={"num_selected": float(len(updates))})
