"""Parameter-efficient adapters through ``peft``, and moving their trainable tensors in and out of the model.

The names of the trainable tensors are the keys of every client update; they are the PEFT state-dict names
with the adapter name removed (``...q_proj.lora_A.weight``), i.e. the names ``peft`` saves and loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import PreTrainedModel

from fedlm.config import PeftConfig
from fedlm.errors import FedlmError
from fedlm.federation.update import TensorDict
from fedlm.seeding import seeded_torch


def attach_adapter(model: PreTrainedModel, config: PeftConfig, seed: int, freeze_lora_a: bool = False) -> PeftModel:
    """Wrap the frozen base model with a LoRA adapter initialised from ``seed`` (global RNG left untouched).

    LoRA: Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models" (W + (alpha/r) B A, B = 0 at init).
    With ``freeze_lora_a`` the A factors keep their seeded random init and only B trains (FFA-LoRA, Sun et al.
    2024); every client derives the same A from the shared seed, so A never travels.
    """
    if config.method != "lora":
        raise FedlmError(f"`peft.method` {config.method!r} is not built; valid: lora")
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    with seeded_torch(seed):
        try:
            peft_model = get_peft_model(model, lora)
        except ValueError as exc:
            raise FedlmError(f"`peft.target_modules` {config.target_modules!r} do not fit this model: {exc}") from None
    if freeze_lora_a:
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return peft_model


def named_trainable_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The adapter's trainable parameters (live, not copies), by PEFT state-dict name."""
    return {state_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def trainable_state(model: PeftModel) -> TensorDict:
    """A detached copy of the adapter's trainable tensors, by PEFT state-dict name."""
    names = set(named_trainable_parameters(model))
    state = get_peft_model_state_dict(model)
    return {name: tensor.detach().clone() for name, tensor in state.items() if name in names}


def load_trainable_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the adapter in place (names as returned by :func:`trainable_state`)."""
    by_name = named_trainable_parameters(model)
    missing = set(by_name) - set(state)
    if missing:
        raise KeyError(f"adapter state lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        for name, param in by_name.items():
            param.copy_(state[name].to(param.dtype))


def save_adapter(model: PeftModel, state: Mapping[str, torch.Tensor], out_dir: Path) -> None:
    """Save ``state`` as a PEFT adapter folder, loadable with ``PeftModel.from_pretrained(base, out_dir)``."""
    load_trainable_state(model, state)
    model.save_pretrained(str(out_dir))


def state_name(param_name: str) -> str:
    """``base_model.model.x.lora_A.default.weight`` -> ``base_model.model.x.lora_A.weight`` (PEFT's saved name)."""
    return param_name.replace(".default.", ".").replace(".default", "")
