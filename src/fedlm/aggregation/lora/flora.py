"""``flora`` LoRA aggregation: the clients' LoRA modules stacked, merged into the frozen weight, restarted each round.

FLoRA, Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations" (NeurIPS), the stacking-based aggregation: client k trains a LoRA of its own rank r_k from a fresh
start (B_k = 0); the server stacks the modules,

    B_stack = [B_1, ..., B_K] (d_out, sum r_k),   A_stack = [p_1 A_1; ...; p_K A_K] (sum r_k, d_in),

so that B_stack A_stack = sum_k p_k B_k A_k exactly (no cross terms, any mix of ranks, no SVD), and every client
merges B_stack A_stack into its frozen weight and starts the next round with fresh LoRA modules.

In fedlm the merged updates accumulate in each module's frozen residual R (:mod:`fedlm.models.residual`) and the
fresh modules are the run's initial A with B = 0, the same every round (clients hold no state between rounds, so a
resumed run replays exactly; the paper's clients draw a new random A). The aggregator works on the effective product
P = B A + R (:mod:`fedlm.aggregation.lora.residual`): a client's change of it is B_k A_k, and FedAvg's weighted sum of
those is the stacked product above, which :func:`stack_lora` builds and a test holds equal; any other aggregator is
applied to P as to any tensor. Clients of smaller rank (``peft.client_ranks``) train their first r_k components.
Every client downloads R, a dense (d_out, d_in) matrix per module; that is the stateless-client form of the
paper's download of the stacked modules (a client that missed a round could not rebuild its weight from one stack).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlm.aggregation.lora.exact import PRODUCT_SUFFIX, ProductDelta
from fedlm.aggregation.lora.mode import register_lora_mode
from fedlm.aggregation.lora.residual import ResidualProductMode
from fedlm.aggregation.lora_structure import RESIDUAL_SUFFIX
from fedlm.core.update import TensorDict


@register_lora_mode
class FLoRA(ResidualProductMode):
    """Merge the weighted sum of the client products into the frozen residual; restart LoRA at (A_0, 0)."""

    name = "flora"
    space = "product B A + R per module (FLoRA stacking), merged into the frozen weight; LoRA restarted every round"
    needs_each_update = "it needs each client's own product B_k A_k (the stacked modules), not a sum of factors"
    keeps_factors = False

    def client_delta(self, start: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        return ProductDelta(start, delta)

    def from_server_space(self, params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> tuple[TensorDict, dict[str, float]]:
        pairs, out = self.split_result(params, state)
        for pair in pairs:
            out[pair.module + RESIDUAL_SUFFIX] = params[pair.module + PRODUCT_SUFFIX].to(torch.float32)  # merged: R' = P'
            out[pair.a] = self.initial_state[pair.a].to(state[pair.a].dtype)  # fresh modules: the initial A ...
            out[pair.b] = torch.zeros_like(state[pair.b])  # ... and B = 0, so B A + R' = P'
        return out, {}


def stack_lora(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking (Wang et al. 2024) of client modules (B_k (d_out, r_k), A_k (r_k, d_in)) with
    weights p_k: (B_stack (d_out, sum r_k), A_stack (sum r_k, d_in)) whose product is sum_k p_k B_k A_k."""
    b_stack = torch.cat([b for b, _ in factors], dim=1)
    a_stack = torch.cat([p * a for (_, a), p in zip(factors, weights)], dim=0)
    return b_stack, a_stack
