"""Two LoRA adapters active at once on the shared model, each output scaled: FedDPA's combination
(Yang et al. 2024, Sec. 4.3) with a fixed weight, ``h = W0 x + alpha * B_g A_g x + (1 - alpha) * B_l A_l x``.

The global adapter is the model's own (``default``); the local one is added beside it for the duration and removed
afterwards, leaving the model as it was (which tensors train, their scaling, the active adapter)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

LOCAL = "fedlm_local"


@contextmanager
def with_local_adapter(model: PeftModel, local_state: Mapping[str, torch.Tensor], weight: float) -> Iterator[None]:
    """Inside, ``model`` computes with its current adapter scaled by ``weight`` plus ``local_state`` (same names
    and shapes as the model's own adapter state) scaled by ``1 - weight``."""
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    model.add_adapter(LOCAL, model.peft_config["default"])
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if f".{LOCAL}." in name:
                    param.copy_(local_state[name.replace(f".{LOCAL}.", ".")].to(param.dtype))
        model.base_model.set_adapter(["default", LOCAL])  # type: ignore[operator]  # LoraModel.set_adapter takes a list
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        saved = [dict(layer.scaling) for layer in layers]
        for layer in layers:
            layer.scaling["default"] *= weight
            layer.scaling[LOCAL] *= 1.0 - weight
        try:
            yield
        finally:
            for layer, scaling in zip(layers, saved):
                layer.scaling.update(scaling)
    finally:
        model.base_model.set_adapter("default")  # type: ignore[operator]
        model.delete_adapter(LOCAL)
        for name, param in model.named_parameters():
            param.requires_grad_(trainable.get(name, False))
