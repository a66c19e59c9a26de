"""Building the emulator of offsite-tuning (Xiao et al. 2023, Sec. 3.2) from the full model, and its size.

The emulator is a deep copy of the full model (with its adapter modules, when it has them) in which the decoder's
layer list holds only the kept layers. The list is a :class:`KeptLayers`: it iterates its layers in order like any
``nn.ModuleList`` (so the model's forward runs unchanged), but every layer keeps its full-model index as its name
(``model.layers.11.self_attn.q_proj...``). Hence an adapter trained on the emulator has exactly the full model's
parameter names, and peft's ``layers_to_transform`` selects the same layers in both. Each kept layer's attention
gets its emulator position as ``layer_idx`` (the KV cache is per position) and the emulator's config its depth.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel

from fedlm.core.errors import FedlmError
from fedlm.core.update import TensorDict
from fedlm.offsite.layers import LayerPlan

_ADAPTER_MARKS = ("lora_", "ia3_", "prompt_encoder", "modules_to_save")


class KeptLayers(nn.ModuleList):
    """A ``ModuleList`` whose children are named by their index in the full model (not their position here).

    Iteration, ``len`` and slicing go by position, as in ``nn.ModuleList``; an integer index is a position too.
    """

    def __init__(self, layers: Iterable[tuple[int, nn.Module]]) -> None:
        super().__init__()
        self._modules = OrderedDict((str(index), layer) for index, layer in layers)

    def __getitem__(self, idx: int | slice) -> nn.Module | nn.ModuleList:  # type: ignore[override]
        """The layer at position ``idx``, or a plain ``ModuleList`` of a slice (what the decoder's forward iterates)."""
        layers = list(self._modules.values())
        return nn.ModuleList(layers[idx]) if isinstance(idx, slice) else layers[idx]

    def _get_abs_string_index(self, idx: int) -> str:
        """The child name at position ``idx`` (negative counts from the end), for assignment and deletion."""
        return list(self._modules)[int(idx)]


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (the module with ``layers``) of a causal LM, under its peft wrapper if any.

    Raises:
        FedlmError: the model has no ``model.layers`` list (offsite-tuning handles Llama-style decoders).
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    decoder = getattr(base, "model", None)
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise FedlmError(
            f"`offsite`: {type(base).__name__} has no `model.layers` decoder list; offsite-tuning needs a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM2)"
        )
    return decoder


def layers_of(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list of ``model``."""
    layers = decoder_of(model).layers
    if not isinstance(layers, nn.ModuleList):  # decoder_of checked it
        raise TypeError(f"model.layers is a {type(layers).__name__}")
    return layers


def num_layers_of(model: nn.Module) -> int:
    """The decoder layers of ``model``."""
    return len(layers_of(model))


def build_emulator(full: PeftModel | PreTrainedModel, plan: LayerPlan) -> PeftModel | PreTrainedModel:
    """A deep copy of ``full`` holding only ``plan.kept`` layers (named by their full-model index); ``full`` is left
    as it was. Only the kept layers are copied: the dropped ones never exist in the emulator."""
    decoder, layers = decoder_of(full), layers_of(full)
    if len(layers) != plan.num_layers:
        raise ValueError(f"the plan is for {plan.num_layers} layers, the model has {len(layers)}")
    decoder.layers = nn.ModuleList()  # detached while the rest is copied
    try:
        emulator = copy.deepcopy(full)
    finally:
        decoder.layers = layers
    kept = KeptLayers((index, copy.deepcopy(layers[index])) for index in plan.kept)
    for position, layer in enumerate(kept):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = position
    decoder_of(emulator).layers = kept
    config: Any = emulator.get_base_model().config if isinstance(emulator, PeftModel) else emulator.config
    config.num_hidden_layers = len(plan.kept)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == plan.num_layers:
        config.layer_types = [layer_types[i] for i in plan.kept]
    return emulator


def base_weights(model: nn.Module) -> TensorDict:
    """The frozen base weights of ``model`` by name, adapter tensors left out: what the server ships to a client
    (tied weights once)."""
    seen: set[int] = set()
    out: TensorDict = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if is_adapter_name(name) or id(param) in seen:
            continue
        seen.add(id(param))
        out[name] = param
    return out


def weight_bytes(weights: TensorDict) -> int:
    """Bytes of ``weights`` in their stored dtype."""
    return sum(t.numel() * t.element_size() for t in weights.values())


def layer_weights(model: nn.Module, layers: Iterable[int]) -> TensorDict:
    """The base weights of the decoder layers ``layers`` (by full-model index) of ``model``."""
    marks = tuple(f".layers.{i}." for i in layers)
    return {name: t for name, t in base_weights(model).items() if any(m in name for m in marks)}


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name belongs to an adapter (not the base model)."""
    return any(mark in name for mark in _ADAPTER_MARKS)


def parameters_of_layers(model: nn.Module, layers: Iterable[int]) -> list[torch.nn.Parameter]:
    """The base (non-adapter) parameters of decoder layers ``layers`` (full-model indices): what distillation trains."""
    return list(layer_weights(model, layers).values())  # type: ignore[arg-type]  # base_weights holds Parameters
