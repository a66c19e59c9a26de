"""FLAME: cluster the updates by direction, keep the majority, clip to the median norm, add a little noise.

Nguyen, Rieger, Chen, Yalame, Möllering, Fereidooni, Marchal, Miettinen, Mirhoseini, Zeitouni, Koushanfar,
Sadeghi & Schneider 2022, "FLAME: Taming Backdoors in Federated Learning" (USENIX Security), Algorithm 1:

    c_ij  = 1 - <Delta_i, Delta_j> / (||Delta_i|| ||Delta_j||)                 (cosine distances, K x K)
    L     = the majority cluster of HDBSCAN(c; min_cluster_size = K//2 + 1, min_samples = 1,
            allow_single_cluster) (noise points, label -1, are never admitted)
    e_i   = ||Delta_i||,   S_t = median(e_1, ..., e_K)                       (over all K updates)
    Delta = 1/|L| sum_{l in L} Delta_l * min(1, S_t / e_l)                   (clip, then equal-weight mean)
    w_{t+1} = w_t + server_lr * Delta + N(0, sigma² I),   sigma = lambda * S_t

Choices made here:
- Distances and norms are measured on ``geometry.distance_view`` (for LoRA: the product changes ΔW = B·A per
  module, flattened over all modules and other tensors), and clipping scales the client's raw delta (see
  ``norm_bound.py`` for what that means under ``naive``). Algorithm 1 writes CosineDistance(W_1, ..., W_n) on the
  local models; fedlm takes the angles between the updates W_i - w_t instead, because the local models all share
  w_t, which would dominate every angle.
- A zero update has cosine distance 0 to another zero update and 1 to any other update.
- The mean is unweighted, as Algorithm 1 (num_examples does not enter; a client with none is left out first).
- K = 1: the single update is admitted (HDBSCAN needs two points). If HDBSCAN finds no cluster, no update is
  admitted and the step is the noise alone.
- lambda defaults to 0.001, the value the paper reports for its image-classification and word-prediction
  (NLP) experiments (0.01 for the IoT intrusion-detection one). The noise is drawn from a torch.Generator seeded
  by ``derive_seed(seed, "flame", round)``, ``round`` counting this aggregator's steps (kept in its state), and is
  added to every tensor of the aggregator's space (A and B under ``naive``, the products under ``exact``).
- Zero updates give S_t = 0, hence sigma = 0: no noise, and w is a fixed point. Because of the noise and the
  clipping, K identical updates do not return w + Delta exactly (``returns_mean_update`` is False).

There is no FLAME strategy in Flower 1.41 to compare with.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field

from fedlm.aggregation.base import AggregationResult, AggregatorParams, register_aggregator
from fedlm.aggregation.robust.geometry import (
    RobustAggregator,
    RobustDelta,
    RobustParams,
    distance_view,
    gram_matrix,
    scaled,
    zeros_like,
)
from fedlm.aggregation.weights import weighted_sum
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed, torch_generator
from fedlm.core.update import ClientUpdate, TensorDict


def cosine_distances(gram: torch.Tensor) -> torch.Tensor:
    """1 - cos(x_i, x_j) from the Gram matrix: (K, K) float64, symmetric, in [0, 2], zero diagonal."""
    gram = gram.to(torch.float64)
    norm = gram.diagonal().clamp_min(0).sqrt()  # (K,)
    denom = norm[:, None] * norm[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(gram))
    dist = (1.0 - cos).clamp(0.0, 2.0)
    dist[(norm[:, None] == 0) & (norm[None, :] == 0)] = 0.0
    dist = (dist + dist.T) / 2
    return dist.fill_diagonal_(0.0)


def majority_cluster(distances: torch.Tensor) -> list[int]:
    """The indices in HDBSCAN's largest cluster (min_cluster_size K//2 + 1, so at most one exists); noise never."""
    k = distances.shape[0]
    if k == 1:
        return [0]
    try:
        from sklearn.cluster import HDBSCAN  # noqa: PLC0415 - scikit-learn loads only when FLAME runs
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise FedlmError("aggregator 'flame' needs scikit-learn; install it with `pip install scikit-learn`") from exc
    clusterer = HDBSCAN(min_cluster_size=k // 2 + 1, min_samples=1, metric="precomputed", allow_single_cluster=True, copy=True)
    labels = clusterer.fit(distances.to(torch.float64).numpy()).labels_.tolist()
    counts = Counter(label for label in labels if label >= 0)
    if not counts:
        return []
    majority = min(counts, key=lambda label: (-counts[label], label))
    return [i for i, label in enumerate(labels) if label == majority]


def flame_delta(
    tensors: Sequence[Mapping[str, torch.Tensor]], update_norms: Sequence[float], admitted: Sequence[int], median_norm: float
) -> tuple[TensorDict | None, list[float]]:
    """1/|L| sum_{l in L} Delta_l min(1, S_t / e_l) (float32) and the clip factors of the admitted; None if L is empty."""
    if not admitted:
        return None, []
    factors = [1.0 if update_norms[i] <= median_norm else median_norm / update_norms[i] for i in admitted]
    weight = 1.0 / len(admitted)
    return weighted_sum([scaled(tensors[i], s) for i, s in zip(admitted, factors)], [weight] * len(admitted)), factors


@register_aggregator("flame")
class Flame(RobustAggregator):
    """FLAME's filter, clip and noise; state: the number of steps taken (seeds the noise)."""

    needs_individual_updates = "it clusters the individual client updates and clips them to their median norm"

    class Params(RobustParams):
        """FLAME's noise level and the seed of its noise."""

        noise_lambda: float = Field(0.001, ge=0, allow_inf_nan=False, description="lambda: noise sigma = lambda * median update norm")
        seed: int = Field(0, ge=0, description="seed of the server noise, derived per round")

    params: Flame.Params
    returns_mean_update = False

    def __init__(self, params: AggregatorParams) -> None:
        super().__init__(params)
        self._round = 0

    def robust_delta(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> RobustDelta:
        views = [distance_view(global_params, u.tensors) for u in updates]
        gram = gram_matrix(views)  # (K, K)
        update_norms = gram.diagonal().clamp_min(0).sqrt().tolist()
        admitted = majority_cluster(cosine_distances(gram))
        median_norm = float(torch.tensor(update_norms, dtype=torch.float64).quantile(0.5))
        delta, factors = flame_delta([u.tensors for u in updates], update_norms, admitted, median_norm)
        metrics = {
            "num_selected": float(len(admitted)),
            "num_clipped": float(sum(s < 1.0 for s in factors)),
            "median_norm": median_norm,
        }
        return RobustDelta(
            zeros_like(global_params) if delta is None else delta,
            metrics=metrics,
            excluded=[u.client_id for i, u in enumerate(updates) if i not in admitted],
            client_weights={updates[i].client_id: s / len(admitted) for i, s in zip(admitted, factors)},
        )

    def aggregate(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> AggregationResult:
        """The filtered, clipped mean step, plus N(0, (lambda S_t)²) noise on every coordinate."""
        result = super().aggregate(global_params, updates)
        self._round += 1
        sigma = self.params.noise_lambda * result.metrics["median_norm"]
        if sigma > 0:
            generator = torch_generator(derive_seed(self.params.seed, "flame", self._round))
            for name in sorted(result.params):
                p = result.params[name]
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device)
                result.params[name] = (p.to(torch.float32) + sigma * noise).to(p.dtype)
        result.metrics["noise_sigma"] = sigma
        result.metrics["server_step"] = float(self._round)
        return result

    def state_dict(self) -> dict[str, Any]:
        """``{"round": int64 scalar}``: the steps taken, which seed the next round's noise."""
        return {"round": torch.tensor(self._round, dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; an empty mapping means a fresh start."""
        unknown = set(state) - {"round"}
        if unknown:
            raise ValueError(f"aggregator 'flame' got unknown state keys {sorted(unknown)}")
        self._round = int(state.get("round", 0))
