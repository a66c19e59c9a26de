"""What the robust aggregators share: the updates that take part, the space distances live in, and the step.

Which updates take part. A client with ``num_examples == 0`` has no weight in FedAvg, but a rule that counts votes
(median, trimmed mean) or neighbours (Krum, FLAME) would let it vote. Such clients are left out before any robust
rule runs and reported in ``AggregationResult.excluded``. The remaining updates are sorted by client id, so every
rule sees the same order whatever order the server passed them in (ties are broken by client id).

Distances and norms. For LoRA updates, distances and norms are computed on the products ΔW = B·A per module
(naive mode: formed here from the global factors and each client's delta, ΔW = (B + dB)(A + dA) - B A, with
:class:`fedlm.aggregation.lora.exact.ProductDelta`; exact: the aggregator already works on products; ffa: on B,
which is exact for the mean since A is shared; there ΔW_k = dB_k A is linear in dB_k, and distances on B are the
product distances up to the fixed metric A Aᵀ, the same for every client). The scale alpha / r is common to all
clients and left out. Non-LoRA tensors count as they are. Under ``naive`` with heterogeneous ranks the mode has
already rescaled rank components by their coverage, so the products formed here are those of the rescaled deltas.

Coordinate-wise statistics (median, trimmed mean) work in the aggregator's own space (under ``exact`` that is the
product space, under ``naive`` the factors A and B, each coordinate on its own).

The step. Every robust rule gives a robust delta; the server moves w_{t+1} = w_t + server_lr * robust_delta (float32
arithmetic, each tensor keeps its dtype).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import Field

from fedlm.aggregation.base import AggregationResult, Aggregator, AggregatorParams
from fedlm.aggregation.lora.exact import ProductDelta
from fedlm.aggregation.lora_structure import lora_pairs
from fedlm.aggregation.weights import global_norm
from fedlm.core.errors import FedlmError
from fedlm.core.update import ClientUpdate, TensorDict


class RobustParams(AggregatorParams):
    """Parameters every robust aggregator has."""

    server_lr: float = Field(1.0, gt=0, allow_inf_nan=False, description="server learning rate: w + server_lr * robust delta")


@dataclass
class RobustDelta:
    """A robust rule's answer: the delta to apply and what to log about it.

    Attributes:
        delta: The robust delta by tensor name (float32), in the aggregator's space.
        metrics: Scalars about the rule (``num_selected``, ...).
        excluded: Clients the rule left out.
        client_weights: Each client's weight in ``delta``, where the rule weights clients.
    """

    delta: TensorDict
    metrics: dict[str, float] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    client_weights: dict[str, float] = field(default_factory=dict)


def usable_updates(updates: Sequence[ClientUpdate]) -> tuple[list[ClientUpdate], list[str]]:
    """The updates with ``num_examples > 0`` sorted by client id, and the ids of those left out."""
    kept = sorted((u for u in updates if u.num_examples > 0), key=lambda u: u.client_id)
    dropped = sorted(u.client_id for u in updates if u.num_examples <= 0)
    if not kept:
        raise FedlmError(
            f"a robust aggregator got {len(updates)} update(s) and every one has num_examples 0; at least one client must train on some examples"
        )
    return kept, dropped


def distance_view(global_params: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The client delta as distances see it: per LoRA A/B pair the product change, other tensors as they are.

    Args:
        global_params: The global tensors the client started from (the LoRA factors A and B under ``naive``).
        tensors: The client's delta by the same names.

    Returns:
        A lazy mapping ``<module>.lora_product -> (B + dB)(A + dA) - B A`` (d_out, d_in) plus every non-LoRA
        tensor (float32) when ``global_params`` holds A/B pairs; otherwise ``tensors`` itself.
    """
    pairs, _ = lora_pairs(global_params)
    if not pairs:
        return tensors
    missing = [name for p in pairs for name in (p.a, p.b) if name not in tensors]
    if missing:
        raise ValueError(f"client delta lacks the LoRA factors {missing} that the global parameters have")
    return ProductDelta(global_params, tensors)


def _stacked(views: Sequence[Mapping[str, torch.Tensor]], name: str) -> torch.Tensor:
    """One tensor of every client, flattened and stacked: (K, numel), float64."""
    return torch.stack([view[name].reshape(-1).to(torch.float64) for view in views])


def pairwise_sq_distances(views: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """||x_i - x_j||² over all tensors together: (K, K), float64, exactly 0 between identical clients.

    Summed tensor by tensor (module by module for LoRA products), so only one module's K products are held at once.
    """
    k = len(views)
    out = torch.zeros(k, k, dtype=torch.float64)
    for name in sorted(views[0]):
        x = _stacked(views, name)  # (K, numel)
        out += torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()
    return out


def gram_matrix(views: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """<x_i, x_j> over all tensors together: (K, K), float64, summed tensor by tensor."""
    k = len(views)
    out = torch.zeros(k, k, dtype=torch.float64)
    for name in sorted(views[0]):
        x = _stacked(views, name)  # (K, numel)
        out += x @ x.T
    return out


def norms(views: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """||x_k|| over all tensors together: (K,), float64."""
    sq = torch.zeros(len(views), dtype=torch.float64)
    for name in sorted(views[0]):
        sq += _stacked(views, name).square().sum(dim=1)
    return sq.sqrt()


def scaled(tensors: Mapping[str, torch.Tensor], factor: float) -> TensorDict:
    """Every tensor times ``factor`` (float32)."""
    return {name: t.to(torch.float32) * factor for name, t in tensors.items()}


def zeros_like(global_params: Mapping[str, torch.Tensor]) -> TensorDict:
    """A zero delta (float32) by the names of ``global_params``."""
    return {name: torch.zeros_like(p, dtype=torch.float32) for name, p in global_params.items()}


def server_step(global_params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], server_lr: float) -> TensorDict:
    """w + server_lr * delta per tensor (float32 arithmetic, result in each tensor's dtype)."""
    if set(delta) != set(global_params):
        raise ValueError(f"robust delta has tensors {sorted(delta)} but the global parameters are {sorted(global_params)}")
    return {
        name: (p.to(torch.float32) + server_lr * delta[name].to(device=p.device, dtype=torch.float32)).to(p.dtype)
        for name, p in global_params.items()
    }


class RobustAggregator(Aggregator):
    """A stateless robust rule: leave out empty clients, sort by id, apply the rule, step w + server_lr * delta."""

    Params = RobustParams
    params: RobustParams

    def __init__(self, params: AggregatorParams) -> None:
        if not isinstance(params, type(self).Params):
            raise TypeError(f"{type(self).__name__} needs {type(self).__name__}.Params, got {type(params).__name__}")
        super().__init__(params)

    @abstractmethod
    def robust_delta(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> RobustDelta:
        """The rule itself, on a non-empty list of updates with num_examples > 0 sorted by client id."""

    def aggregate(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> AggregationResult:
        """w + server_lr * robust_delta; clients with num_examples 0 are left out first (listed in ``excluded``)."""
        usable, dropped = usable_updates(updates)
        out = self.robust_delta(global_params, usable)
        new = server_step(global_params, out.delta, self.params.server_lr)
        excluded = sorted([*dropped, *out.excluded])
        metrics = {
            "num_updates": float(len(usable)),
            "num_excluded": float(len(excluded)),
            "update_norm": global_norm(out.delta),
            **out.metrics,
        }
        return AggregationResult(params=new, metrics=metrics, excluded=excluded, client_weights=out.client_weights)
