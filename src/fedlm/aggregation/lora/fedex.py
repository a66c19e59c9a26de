"""``fedex`` LoRA aggregation: the factors averaged, and what their product misses folded into the frozen weight.

FedEx-LoRA, Singhal, Ponkshe & Vepakomma 2025, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Large Language Models" (ACL): clients train A and B as usual; the server sends back
the averaged factors mean(A_k), mean(B_k) and adds the residual

    mean(B_k A_k) - mean(B_k) mean(A_k)

to the frozen weight, so that the global model computes exactly W0 + (alpha / r) mean(B_k A_k): no cross terms are
lost, and clients keep training a rank-r LoRA. The residual accumulates over rounds in the module's frozen residual
R (:mod:`fedlm.models.residual`), which every client downloads (a dense (d_out, d_in) matrix per module: the price of
exactness in bytes, counted in the traffic metrics).

The aggregator works on the factors A, B and on the effective product P = B A + R per module
(:mod:`fedlm.aggregation.lora.residual`); from its result (A', B', P') the new residual is R' = P' - B' A'. With
FedAvg that is the paper's rule; with any other aggregator the model is still exactly the aggregator's P'
(it treats P as it treats every other tensor), with factors equal to its result on the factors. Logged each round:
``fedex_cross_term`` = ||dP - d(B A)|| / ||dP||, the share of this round's aggregate change of the product that the
averaged factors miss (what ``naive`` would drop), and ``fedex_residual_share`` = ||R|| / ||P||.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from fedlm.aggregation.lora.exact import PRODUCT_SUFFIX, ProductDelta
from fedlm.aggregation.lora.mode import register_lora_mode
from fedlm.aggregation.lora.residual import ResidualProductMode, effective_products, relative_norm
from fedlm.aggregation.lora_structure import RESIDUAL_SUFFIX
from fedlm.core.update import TensorDict


@register_lora_mode
class FedExLora(ResidualProductMode):
    """Average A and B; keep mean(B_k A_k) - mean(B_k) mean(A_k) in the module's frozen residual."""

    name = "fedex"
    space = "LoRA factors A, B and the product B A + R per module; residual R = P - B A folded into the frozen weight"
    needs_each_update = "it needs each client's own product B_k A_k to compute the residual of the averaged factors"
    refuses_client_ranks = (
        "the averaged factors would mix components that some clients never train; `flora` and `exact` are the exact modes for mixed ranks"
    )
    keeps_factors = True

    def client_delta(self, start: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        return FactorsAndProducts(start, delta)

    def from_server_space(self, params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> tuple[TensorDict, dict[str, float]]:
        pairs, out = self.split_result(params, state)
        before = effective_products(state)
        missed = moved = residual_sq = product_sq = 0.0
        for pair in pairs:
            a, b = params[pair.a].to(torch.float32), params[pair.b].to(torch.float32)
            product = params[pair.module + PRODUCT_SUFFIX]  # P' (d_out, d_in)
            factors = b @ a  # B' A'
            residual = product - factors  # R' = P' - B' A', so B' A' + R' = P'
            old_factors = state[pair.b].to(torch.float32) @ state[pair.a].to(torch.float32)
            change = product - before[pair.module + PRODUCT_SUFFIX]  # dP this round
            missed += float((change - (factors - old_factors)).square().sum())
            moved += float(change.square().sum())
            residual_sq += float(residual.square().sum())
            product_sq += float(product.square().sum())
            out[pair.a], out[pair.b] = a.to(state[pair.a].dtype), b.to(state[pair.b].dtype)
            out[pair.module + RESIDUAL_SUFFIX] = residual
        return out, {"fedex_cross_term": relative_norm(missed, moved), "fedex_residual_share": relative_norm(residual_sq, product_sq)}


class FactorsAndProducts(Mapping[str, torch.Tensor]):
    """A client's update in FedEx-LoRA's space: its deltas of A, B and the other tensors as sent, plus per module
    its change of the product (B + dB)(A + dA) - B A, computed when read (:class:`ProductDelta`)."""

    def __init__(self, start: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
        self._delta = delta
        self._products = ProductDelta(start, delta)
        self._product_names = {name for name in self._products if name.endswith(PRODUCT_SUFFIX)}
        self._names = sorted({*delta, *self._product_names})

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._product_names:
            return self._products[name]
        return self._delta[name].to(torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
