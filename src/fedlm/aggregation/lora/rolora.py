"""``rolora`` LoRA aggregation: rounds alternate between training B (A frozen) and training A (B frozen).

RoLoRA, Chen, Guo, Ju, Dalal, Zhu & Khisti 2025, "Robust Federated Finetuning of LLMs via Alternating Optimization
of LoRA" (NeurIPS): with one factor frozen and shared by every client, the update is linear in the trained one,

    sum_k p_k B_k A = (sum_k p_k B_k) A,    sum_k p_k B A_k = B (sum_k p_k A_k),

so averaging the trained factor is exact within a round (no cross terms), while over rounds both factors learn (FFA-
LoRA's expressiveness limit, A fixed forever, is lifted). Odd rounds train B and even rounds A: B starts at zero, so
a first round on A would get no gradient (dL/dA = (alpha / r) B^T dL/dW = 0).

The round's frozen factor reaches clients in their plan (:class:`~fedlm.core.task.LocalPlan` ``frozen``): the trainer
leaves it out of the optimizer and out of backward, so its delta is exactly 0. The aggregator works on the factors
themselves; the frozen one is then put back from the global state, so a server optimizer's momentum (FedAdam,
FedAvgM) or client-level DP noise never moves it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlm.aggregation.lora.mode import LoraMode, register_lora_mode
from fedlm.aggregation.lora_structure import lora_role
from fedlm.core.update import TensorDict


def trained_factor(round_num: int) -> str:
    """The factor trained in round ``round_num`` (1-based): "B" in odd rounds, "A" in even ones."""
    return "B" if round_num % 2 == 1 else "A"


@register_lora_mode
class RoLora(LoraMode):
    """Alternate the trained factor by round; average it; keep the frozen one as it was."""

    name = "rolora"
    space = "LoRA factors, B trained and averaged in odd rounds and A in even ones (the other frozen), exact"
    refuses_client_ranks = (
        "RoLoRA averages the trained factor against one frozen factor shared at the global rank; `flora` or `exact` handle mixed ranks"
    )
    client_extra = "the factor each round freezes"

    def __init__(self, initial_state: Mapping[str, torch.Tensor], full_rank: int) -> None:
        super().__init__(initial_state, full_rank)
        self.round: int | None = None

    def begin_round(self, round_num: int) -> None:
        self.round = round_num

    def frozen_factor(self, round_num: int) -> str | None:
        return "A" if trained_factor(round_num) == "B" else "B"

    def from_server_space(self, params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> tuple[TensorDict, dict[str, float]]:
        out = dict(params)
        if self.round is not None:
            frozen = self.frozen_factor(self.round)
            for name in out:
                if lora_role(name) == frozen:
                    out[name] = state[name]
        return out, {}
