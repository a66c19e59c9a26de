"""FLTrust: trust the clients whose update points the way of the server's own update on a small clean root set.

Cao, Fang, Liu & Gong 2021, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping" (NDSS),
Algorithm 1 and eq. (2)-(4). Each round the server trains from the global model on its root dataset, giving g_0, and
for every client update g_i

    TS_i = ReLU(cos(g_i, g_0)),   g_i' = (||g_0|| / ||g_i||) g_i,   g = sum_i TS_i g_i' / sum_i TS_i,

then w_{t+1} = w_t + server_lr * g. Cosines and norms are measured on ``geometry.distance_view`` (for LoRA: the
product changes Delta W = B A per module); the magnitude normalisation scales each client's delta in the
aggregator's space (exactly the product change under ``exact`` and ``ffa``, to first order under ``naive``). If no
client has a positive trust score the global model stays as it is. Unweighted by ``num_examples``, as in the paper.

The root set: ``aggregation.root_size`` clean training examples drawn with the config seed before any data
poisoning (the paper's assumption: the server holds a small clean dataset of the task); the server update uses the
same local steps, batch size and learning rates as the clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import Field

from fedlm.aggregation.base import register_aggregator
from fedlm.aggregation.robust.geometry import RobustAggregator, RobustDelta, RobustParams, distance_view, gram_matrix, scaled, zeros_like
from fedlm.aggregation.weights import weighted_sum
from fedlm.core.errors import FedlmError
from fedlm.core.update import ClientUpdate


def trust_scores(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(TS_i, ||g_0|| / ||g_i||) for i >= 1 from the Gram matrix of [g_0, g_1, ..., g_K] (float64)."""
    norms = gram.diagonal().clamp_min(0).sqrt()  # (K+1,)
    cos = gram[0, 1:] / (norms[0] * norms[1:]).clamp_min(1e-30)
    scores = torch.where((norms[0] > 0) & (norms[1:] > 0), cos.clamp_min(0), torch.zeros_like(cos))
    ratio = torch.where(norms[1:] > 0, norms[0] / norms[1:].clamp_min(1e-30), torch.zeros_like(cos))
    return scores, ratio


@register_aggregator("fltrust")
class FLTrust(RobustAggregator):
    """Trust-weighted, magnitude-normalised mean against the server's root-set update."""

    needs_server_update = True
    needs_individual_updates = "it scores each client's update against the server's own root-data update"
    returns_mean_update = False

    class Params(RobustParams):
        root_size: int = Field(100, ge=1, description="clean training examples the server trains on each round")

    params: Params

    def __init__(self, params: RobustParams) -> None:
        super().__init__(params)
        self._server: ClientUpdate | None = None

    def set_server_update(self, update: ClientUpdate) -> None:
        self._server = update

    def robust_delta(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> RobustDelta:
        if self._server is None:
            raise FedlmError("fltrust needs the server's root-set update of this round before it aggregates")
        views = [distance_view(global_params, self._server.tensors), *(distance_view(global_params, u.tensors) for u in updates)]
        scores, ratio = trust_scores(gram_matrix(views))
        total = float(scores.sum())
        ids = [u.client_id for u in updates]
        weights = {c: float(s) / total if total > 0 else 0.0 for c, s in zip(ids, scores)}
        excluded = [c for c, s in zip(ids, scores) if float(s) <= 0.0]
        if total <= 0:
            return RobustDelta(zeros_like(global_params), {"num_selected": 0.0}, excluded, weights)
        normalised = [scaled(u.tensors, float(r)) for u, r in zip(updates, ratio)]
        delta = weighted_sum(normalised, [float(s) / total for s in scores])
        return RobustDelta(delta, {"num_selected": float(len(ids) - len(excluded)), "mean_trust": total / len(ids)}, excluded, weights)
