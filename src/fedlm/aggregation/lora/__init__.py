"""LoRA-aware aggregation modes (``aggregation.lora``): naive, exact (FlexLoRA SVD), ffa (frozen A), fedex (FedEx-LoRA),
flora (FLoRA stacking) and rolora (RoLoRA alternating rounds)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlm.aggregation.lora.mode import LORA_MODES, LoraMode


def build_lora_mode(name: str, initial_state: Mapping[str, torch.Tensor], full_rank: int) -> LoraMode:
    """The LoRA aggregation mode ``name`` for an adapter whose initial tensors are ``initial_state``."""
    return LORA_MODES.get(name)(initial_state, full_rank)


__all__ = ["LORA_MODES", "LoraMode", "build_lora_mode"]
