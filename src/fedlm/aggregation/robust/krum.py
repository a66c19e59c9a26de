"""Krum and Multi-Krum: keep the updates closest to their neighbours.

Blanchard, El Mhamdi, Guerraoui & Stainer 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent" (NeurIPS), Sec. 4. With K updates of which at most f are Byzantine (2f + 2 < K), each update gets the score

    s(i) = sum_{j in N_i} ||V_i - V_j||²,   N_i = the K - f - 2 updates closest to V_i (j != i),

Krum keeps the update of lowest score, Multi-Krum the m lowest (m = K - f by default) and averages them;
w_{t+1} = w_t + server_lr * that average. Distances are measured on ``geometry.distance_view`` (for LoRA: the
product changes ΔW = B·A per module, not the factors). The kept updates are averaged with example weights
n_k / sum_kept n (the paper averages them equally; equal when the kept clients have the same num_examples).
Ties in the score go to the smaller client id.

Small rounds. With f >= 1 and K <= 2f + 2 aggregation raises :class:`FedlmError`: Krum's guarantee needs
K > 2f + 2. With f = 0 (no attacker assumed, the default: set ``num_malicious`` to the number you want to
tolerate) any K is accepted: K - 2 neighbours, at least 1 and at most K - 1 (Flower's ``max(1, K - f - 2)``); a
single update is kept as it is.

Against ``flwr.server.strategy.Krum`` (flwr 1.41, ``aggregate_krum``): the same score with
``num_malicious_clients = f``; with ``num_clients_to_keep = 0`` Flower returns the best local model (Krum), with
``num_clients_to_keep = m > 0`` the example-weighted average (``aggregate``) of the m best (Multi-Krum), as fedlm.
Differences: Flower measures distances between whole flattened local models, fedlm between deltas mapped to LoRA
products (the same for non-LoRA tensors: the global cancels in w + Delta_i - (w + Delta_j)); Flower never refuses
K <= 2f + 2 (it uses at least one neighbour); Flower's Multi-Krum is off unless ``num_clients_to_keep`` is set,
fedlm's ``multikrum`` keeps K - f by default; an m above K keeps all K in both.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence

import torch
from pydantic import Field

from fedlm.aggregation.base import ByzantineBound, register_aggregator
from fedlm.aggregation.robust.geometry import (
    RobustAggregator,
    RobustDelta,
    RobustParams,
    distance_view,
    pairwise_sq_distances,
)
from fedlm.aggregation.weights import example_weights, weighted_sum
from fedlm.core.errors import FedlmError
from fedlm.core.update import ClientUpdate


def check_krum_size(num_clients: int, num_malicious: int) -> None:
    """Refuse a round too small for Krum's guarantee K > 2f + 2 (any K is accepted with f = 0)."""
    if num_malicious < 0:
        raise FedlmError(f"`aggregation.num_malicious` must be >= 0, got {num_malicious}")
    if num_malicious > 0 and num_clients <= 2 * num_malicious + 2:
        raise FedlmError(
            f"Krum with `aggregation.num_malicious` f = {num_malicious} needs more than 2f + 2 = "
            f"{2 * num_malicious + 2} updates per round (Blanchard et al. 2017), got K = {num_clients}; "
            "sample more clients per round or lower `aggregation.num_malicious`"
        )


def krum_scores(sq_distances: torch.Tensor, num_malicious: int) -> torch.Tensor:
    """s(i): the sum of the K - f - 2 smallest ||V_i - V_j||², j != i (K x K input, (K,) float64 output)."""
    k = sq_distances.shape[0]
    check_krum_size(k, num_malicious)
    neighbours = min(k - 1, max(1, k - num_malicious - 2))
    others = sq_distances.to(torch.float64) + torch.diag(torch.full((k,), float("inf"), dtype=torch.float64))
    return others.sort(dim=1).values[:, :neighbours].sum(dim=1)  # (K,)


def krum_select(sq_distances: torch.Tensor, num_malicious: int, num_selected: int) -> list[int]:
    """The indices of the ``num_selected`` lowest Krum scores (ties: the lower index), sorted; all if more than K."""
    scores = krum_scores(sq_distances, num_malicious)
    if num_selected < 1:
        raise ValueError(f"Krum must keep at least one update, got num_selected = {num_selected}")
    order = torch.sort(scores, stable=True).indices
    return sorted(order[:num_selected].tolist())


class _KrumBase(RobustAggregator):
    """Score on product-space distances, keep the best, average the kept deltas with example weights."""

    needs_individual_updates = "it scores each client's update by its distances to the other updates"
    byzantine_bound = ByzantineBound(margin=2, source="Blanchard et al. 2017", assumed_param="num_malicious")

    class Params(RobustParams):
        """Krum's assumed number of Byzantine clients."""

        num_malicious: int = Field(0, ge=0, description="f, the number of Byzantine clients to tolerate (K > 2f + 2)")

    params: _KrumBase.Params

    @abstractmethod
    def num_to_keep(self, num_clients: int) -> int:
        """m, the number of updates kept this round."""

    def robust_delta(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> RobustDelta:
        views = [distance_view(global_params, u.tensors) for u in updates]
        distances = pairwise_sq_distances(views)  # (K, K)
        f = self.params.num_malicious
        keep = krum_select(distances, f, self.num_to_keep(len(updates)))
        weights = example_weights([updates[i].num_examples for i in keep])
        delta = weighted_sum([updates[i].tensors for i in keep], weights)
        scores = krum_scores(distances, f)
        return RobustDelta(
            delta,
            metrics={"num_selected": float(len(keep)), "krum_best_score": float(scores.min())},
            excluded=[u.client_id for i, u in enumerate(updates) if i not in keep],
            client_weights={updates[i].client_id: w for i, w in zip(keep, weights)},
        )


@register_aggregator("krum")
class Krum(_KrumBase):
    """Krum: the single update of lowest score; stateless."""

    def num_to_keep(self, num_clients: int) -> int:
        return 1


@register_aggregator("multikrum")
class MultiKrum(_KrumBase):
    """Multi-Krum: the example-weighted mean of the m updates of lowest score; stateless."""

    class Params(_KrumBase.Params):
        """How many updates Multi-Krum keeps."""

        num_selected: int | None = Field(None, ge=1, description="m, the updates kept per round (None: K - f; above K: all)")

    params: MultiKrum.Params

    def num_to_keep(self, num_clients: int) -> int:
        m = self.params.num_selected
        return num_clients - self.params.num_malicious if m is None else min(m, num_clients)
