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
from collections.abc import Mapping, Sequence

import torch

from fedlm.aggregation.lora.mode import LoraMode
from fedlm.aggregation.lora.structure import lora_pairs
from fedlm.aggregation.lora.svd import factorise, relative_error
from fedlm.federation.update import ClientUpdate, TensorDict

PRODUCT_SUFFIX = ".lora_product"
_DEAD = 1e-7  # singular values below this fraction of the largest one count as zero


class ExactLora(LoraMode):
    """Aggregate B A per module; return a rank-r LoRA by truncated SVD."""

    name = "exact"
    space = "dense product B A per LoRA module (FlexLoRA SVD back to rank r)"

    def to_server_space(
        self,
        state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        starts: Mapping[str, Mapping[str, torch.Tensor]],
        ranks: Mapping[str, int | None],
    ) -> tuple[TensorDict, list[ClientUpdate]]:
        return products(state), [dataclasses.replace(u, tensors=product_delta(starts[u.client_id], u.tensors)) for u in updates]

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


def product_delta(start: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> TensorDict:
    """(B + dB)(A + dA) - B A per module: a client's change of the product from where it started."""
    pairs, others = lora_pairs(start)
    out: TensorDict = {name: delta[name].to(torch.float32) for name in others}
    for pair in pairs:
        b0, a0 = start[pair.b].to(torch.float32), start[pair.a].to(torch.float32)
        b1, a1 = b0 + delta[pair.b].to(torch.float32), a0 + delta[pair.a].to(torch.float32)
        out[pair.module + PRODUCT_SUFFIX] = b1 @ a1 - b0 @ a0
    return out
