"""``naive`` LoRA aggregation: A and B averaged separately, as OpenFedLLM, FederatedScope-LLM and FATE-LLM do.

The mean of the factors is not the mean of the products: sum_k p_k B_k A_k != (sum_k p_k B_k)(sum_k p_k A_k)
(the cross terms p_j p_k B_j A_k remain). Kept as the baseline. With heterogeneous ranks, client updates are
zero-padded to the global rank and every rank component is averaged over the clients that train it (HetLoRA,
Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from fedlm.aggregation.lora.mode import LoraMode, register_lora_mode
from fedlm.aggregation.lora_structure import component_coverage, lora_role
from fedlm.aggregation.weights import example_weights
from fedlm.core.update import ClientUpdate, TensorDict


@register_lora_mode
class NaiveLora(LoraMode):
    """Average the factors; rescale rank components by their coverage when ranks differ."""

    name = "naive"
    space = "LoRA factors A and B, each averaged on its own"

    def to_server_space(
        self,
        state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        starts: Mapping[str, Mapping[str, torch.Tensor]],
        ranks: Mapping[str, int | None],
    ) -> tuple[TensorDict, list[ClientUpdate]]:
        client_ranks = [ranks.get(u.client_id) for u in updates]
        if all(r is None or r >= self.full_rank for r in client_ranks):
            return dict(state), list(updates)
        weights = example_weights([u.num_examples for u in updates])
        coverage = component_coverage(client_ranks, weights, self.full_rank)
        # a weighted mean of deltas scaled by 1/coverage_j averages component j over the clients that have it
        scale = torch.where(coverage > 0, 1.0 / coverage.clamp_min(1e-12), torch.zeros_like(coverage))
        return dict(state), [dataclasses.replace(u, tensors=_rescale(u.tensors, scale)) for u in updates]


def _rescale(tensors: Mapping[str, torch.Tensor], scale: torch.Tensor) -> TensorDict:
    out: TensorDict = {}
    for name, tensor in tensors.items():
        role = lora_role(name)
        if role == "A":
            out[name] = tensor * scale[: tensor.shape[0], None]
        elif role == "B":
            out[name] = tensor * scale[None, : tensor.shape[1]]
        else:
            out[name] = tensor
    return out
