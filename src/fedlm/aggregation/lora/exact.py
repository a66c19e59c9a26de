"""``exact`` LoRA aggregation: the server combines the products Delta W = B A, then re-factorises by SVD.

FlexLoRA, Bai, Li, Zhang, Li & Ding 2024, "Federated Fine-tuning of Large Language Models under Heterogeneous
Tasks and Client Resources" (NeurIPS), Sec. 3.2. Per LoRA module the aggregator works on the dense product
W = B A (the scale alpha / r is common to all clients and left out). Client k's update in that space is
B_k' A_k' - B_k A_k, its trained product minus the product it started from, so the FedAvg step gives exactly
W_g + sum_k p_k (B_k' A_k' - B_k A_k) (no cross terms, any mix of ranks). The new W is returned to clients as its
best rank-r approximation by truncated SVD (not by merging into the base weights, FLoRA-style): the relative
error of that step is logged every round as ``svd_rel_error`` and is 0 whenever rank(W) <= r. Components with a
zero singular value get their initial A row back (with B's column at zero, the product is unchanged), so they
keep receiving gradients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import torch

from fedlm.aggregation.lora.mode import LoraMode, register_lora_mode
from fedlm.aggregation.lora.svd import factorise, relative_error
from fedlm.aggregation.lora_structure import lora_pairs
from fedlm.core.update import ClientUpdate, TensorDict

PRODUCT_SUFFIX = ".lora_product"
_DEAD = 1e-7  # singular values below this fraction of the largest one count as zero


@register_lora_mode
class ExactLora(LoraMode):
    """Aggregate B A per module; return a rank-r LoRA by truncated SVD."""

    name = "exact"
    space = "dense product B A per LoRA module (FlexLoRA SVD back to rank r)"
    needs_each_update = "it needs each client's own product B_k A_k (a sum of factors is not a sum of products)"
    factor_space = False

    def to_server_space(
        self,
        state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        starts: Mapping[str, Mapping[str, torch.Tensor]],
        ranks: Mapping[str, int | None],
    ) -> tuple[TensorDict, list[ClientUpdate]]:
        return products(state), [dataclasses.replace(u, tensors=ProductDelta(starts[u.client_id], u.tensors)) for u in updates]  # type: ignore[arg-type]  # a lazy mapping of products

    def from_server_space(self, params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> tuple[TensorDict, dict[str, float]]:
        pairs, others = lora_pairs(state)
        out: TensorDict = {name: params[name].to(state[name].dtype) for name in others}
        lost = total = worst = 0.0
        revived = 0
        for pair in pairs:
            fact = factorise(params[pair.module + PRODUCT_SUFFIX], self.full_rank)
            b, a = fact.b, fact.a
            dead = fact.singular_values[: self.full_rank] <= _DEAD * float(fact.singular_values.max().clamp_min(1e-30))
            dead = torch.nn.functional.pad(dead, (0, self.full_rank - dead.numel()), value=True)
            if bool(dead.any()):
                a[dead] = self.initial_state[pair.a].to(torch.float32)[dead]
                b[:, dead] = 0
                revived += int(dead.sum())
            out[pair.a], out[pair.b] = a.to(state[pair.a].dtype), b.to(state[pair.b].dtype)
            lost, total = lost + fact.residual_sq, total + fact.total_sq
            worst = max(worst, relative_error(fact.residual_sq, fact.total_sq))
        metrics = {"svd_rel_error": relative_error(lost, total), "svd_rel_error_max_module": worst, "svd_revived_components": float(revived)}
        return out, metrics


def products(state: Mapping[str, torch.Tensor]) -> TensorDict:
    """B A per LoRA module (named ``<module>.lora_product``) plus every non-LoRA tensor as it is."""
    pairs, others = lora_pairs(state)
    out: TensorDict = {name: state[name].to(torch.float32) for name in others}
    for pair in pairs:
        out[pair.module + PRODUCT_SUFFIX] = state[pair.b].to(torch.float32) @ state[pair.a].to(torch.float32)  # (d_out, d_in)
    return out


class ProductDelta(Mapping[str, torch.Tensor]):
    """A client's update in product space, computed per tensor when read and never stored.

    Per module ``(B + dB)(A + dA) - B A`` (d_out, d_in); other tensors are the client's delta. A round of 100
    clients on a 1M-parameter LoRA would need ~10 GB as dense products held at once; read one name at a time (as
    :func:`fedlm.aggregation.weights.weighted_sum` does) it needs one dense matrix per module in flight.
    """

    def __init__(self, start: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
        pairs, others = lora_pairs(start)
        self._start, self._delta = start, delta
        self._pairs = {pair.module + PRODUCT_SUFFIX: pair for pair in pairs}
        self._names = sorted([*self._pairs, *others])

    def __getitem__(self, name: str) -> torch.Tensor:
        pair = self._pairs.get(name)
        if pair is None:
            if name not in self._delta or name not in self._names:
                raise KeyError(name)
            return self._delta[name].to(torch.float32)
        b0, a0 = self._start[pair.b].to(torch.float32), self._start[pair.a].to(torch.float32)
        db, da = self._delta[pair.b].to(torch.float32), self._delta[pair.a].to(torch.float32)
        # (B + dB)(A + dA) - B A = dB (A + dA) + B dA = [dB, B] [A + dA; dA]: one matmul, no cancellation
        return torch.cat([db, b0], dim=1) @ torch.cat([a0 + da, da], dim=0)  # (d_out, 2r) @ (2r, d_in)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def product_delta(start: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> TensorDict:
    """(B + dB)(A + dA) - B A per module, materialised: a client's change of the product from where it started."""
    return dict(ProductDelta(start, delta))
