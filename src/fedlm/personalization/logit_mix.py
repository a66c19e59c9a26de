"""The global and a personal model mixed in their next-token distributions, for scoring:
``p = w p_personal + (1 - w) p_global`` (a mixture of the two models; the ``logits`` mix of inference with the
``linear`` combine). Both models run on the one shared model, the adapter state swapped between the two passes."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from types import SimpleNamespace
from typing import Any

import torch

from fedlm.models.adapters import load_trainable_state


class LogitMixture(torch.nn.Module):
    """Calls like a causal LM (``input_ids``, ``attention_mask``) and returns ``.logits`` = log p of the mixture."""

    def __init__(
        self,
        model: torch.nn.Module,
        global_state: Mapping[str, torch.Tensor],
        personal_state: Mapping[str, torch.Tensor],
        weight: float,
        personal_context: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        super().__init__()
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"a mixture weight must be in [0, 1], got {weight}")
        self.inner = model
        self.global_state, self.personal_state = global_state, personal_state
        self.weight, self.personal_context = weight, personal_context

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> SimpleNamespace:
        load_trainable_state(self.inner, self.global_state)
        glob = torch.log_softmax(self.inner(input_ids=input_ids, attention_mask=attention_mask).logits.float(), dim=-1)  # (B, T, V)
        load_trainable_state(self.inner, self.personal_state)
        with self.personal_context():
            mine = torch.log_softmax(self.inner(input_ids=input_ids, attention_mask=attention_mask).logits.float(), dim=-1)
        if self.weight == 0.0:
            return SimpleNamespace(logits=glob)
        if self.weight == 1.0:
            return SimpleNamespace(logits=mine)
        return SimpleNamespace(logits=torch.logaddexp(mine + math.log(self.weight), glob + math.log1p(-self.weight)))
