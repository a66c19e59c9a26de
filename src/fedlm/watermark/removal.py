"""Watermark removal attacks a thief may run on a stolen copy, for measuring a watermark's robustness.

As in WAFFLE's robustness evaluation (Tekgul et al. 2021, Sec. 6.3; after Uchida et al. 2017): fine-tuning the copy
on other data, and magnitude pruning (each adapter tensor's smallest entries by absolute value set to zero). The
third attack, merging the adapter into the base weights, is ``fedlm export --merge`` itself
(:mod:`fedlm.models.export`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlm.core.task import LocalPlan
from fedlm.core.update import TensorDict
from fedlm.federation.trainer import ClientTrainer
from fedlm.models.adapters import load_trainable_state, trainable_state
from fedlm.objectives import Objective, build_objective
from fedlm.watermark.embed import marked_state


def prune_state(state: Mapping[str, torch.Tensor], fraction: float) -> TensorDict:
    """Every tensor of ``state`` with its ``floor(fraction * numel)`` smallest-magnitude entries set to zero
    (ties broken by position); a tensor's other entries are unchanged."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    pruned: TensorDict = {}
    for name, value in state.items():
        k = math.floor(fraction * value.numel())
        flat = value.detach().clone().reshape(-1)
        if k > 0:
            order = torch.argsort(flat.abs().to(torch.float32), stable=True)  # ascending |w|; equal ones by position
            flat[order[:k]] = 0
        pruned[name] = flat.reshape(value.shape)
    return pruned


def fine_tune(
    model: torch.nn.Module,
    pad_id: int,
    device: torch.device,
    examples: Sequence[Any],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    objective: Objective | None = None,
) -> TensorDict:
    """The model's trainable state after ``steps`` AdamW steps on ``examples`` (the thief's own data), from its
    current state; the model is left holding the result."""
    trainer = ClientTrainer(model, pad_id, device, objective=objective or build_objective("sft"))
    start = trainable_state(model)
    update = trainer.train("__thief__", examples, start, LocalPlan(0, [lr] * steps, min(batch_size, len(examples)), seed))
    state = marked_state(start, update.tensors)
    load_trainable_state(model, state)
    return state
