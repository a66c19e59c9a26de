"""A frozen dense residual beside each LoRA module, carried in the global adapter state.

FedEx-LoRA (Singhal, Ponkshe & Vepakomma 2025, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Large Language Models", ACL) folds the part of the mean client product that the mean factors
miss into the frozen weight; FLoRA (Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS) merges the stacked product into it every round. fedlm keeps
that change of the frozen weight as a tensor of its own per module, ``<module>.lora_residual`` (R, (d_out, d_in),
float32, unscaled): the module computes

    W0 x + (alpha / r) (B A + R) x.

R lives in the global adapter state, not in the base weight, because the base model is loaded once and shared by
every simulated client and the evaluator: as a state tensor it is checkpointed, resumed, sent to every client (its
bytes counted with the download) and exported like the factors. A forward hook on the LoRA layer adds the R term
(no dropout: it is part of the frozen weight), in float32 like peft's own adapter weights.

At export (:func:`fold_residuals`) R becomes extra LoRA components by an SVD of its numerical rank, with a per-module
``rank_pattern`` / ``alpha_pattern`` keeping alpha / r, so the saved folder is a plain peft LoRA adapter that
``PeftModel.from_pretrained`` loads and that computes the same function (up to float error).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import save_file

from fedlm.aggregation.lora_structure import RESIDUAL_SUFFIX, is_residual
from fedlm.core.update import TensorDict

_LAYERS_ATTR = "_fedlm_residual_layers"  # on the model: module name -> the LoRA layer that holds a residual hook
_RESIDUAL_ATTR = "_fedlm_residual"  # on a LoRA layer: its R on the layer's device (None: no residual)
_DEAD = 1e-7  # singular values of R below this fraction of its largest one are dropped at export


def has_residuals(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` carries any module residual."""
    return any(is_residual(name) for name in state)


def apply_residuals(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Make ``model`` compute with the residuals of ``state`` (and with none where ``state`` has none)."""
    layers: dict[str, torch.nn.Module] = getattr(model, _LAYERS_ATTR, {})
    wanted = {name.removesuffix(RESIDUAL_SUFFIX): tensor for name, tensor in state.items() if is_residual(name)}
    if not wanted and not layers:
        return
    for module_name, layer in layers.items():
        if module_name not in wanted:
            setattr(layer, _RESIDUAL_ATTR, None)
    for module_name, residual in wanted.items():
        if module_name not in layers:
            found = model.get_submodule(module_name)
            if not hasattr(found, "scaling") or not hasattr(found, "get_base_layer"):
                raise KeyError(f"{module_name}{RESIDUAL_SUFFIX}: {module_name} is not a LoRA layer of this model")
            found.register_forward_hook(_add_residual)
            layers[module_name] = found
        layer = layers[module_name]
        weight = layer.get_base_layer().weight  # type: ignore[operator]  # a peft LoRA layer
        setattr(layer, _RESIDUAL_ATTR, residual.detach().to(device=weight.device, dtype=torch.float32))
    object.__setattr__(model, _LAYERS_ATTR, layers)  # a plain attribute, not a submodule


def _add_residual(layer: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook: output + (alpha / r) R x for the layer's active adapter (nothing while peft disables it)."""
    residual: torch.Tensor | None = getattr(layer, _RESIDUAL_ATTR, None)
    if residual is None or getattr(layer, "disable_adapters", False):  # the adapter switched off: so is its residual
        return output
    scale = float(layer.scaling[layer.active_adapters[0]])  # type: ignore[index]  # peft's LoRA layer
    x = args[0]
    return output + (torch.nn.functional.linear(x.to(residual.dtype), residual) * scale).to(output.dtype)


def fold_residuals(state: Mapping[str, torch.Tensor], rank: int) -> tuple[TensorDict, dict[str, int]]:
    """``state`` with every residual R turned into extra LoRA components: per module B' = [B, U S^1/2],
    A' = [A; S^1/2 V^T] over R's singular values above ``_DEAD`` of its largest, so B' A' = B A + R (float64 SVD,
    exact up to the dropped near-zero values). Returns the tensors and each folded module's new rank."""
    out: TensorDict = {name: tensor.to(torch.float32) for name, tensor in state.items() if not is_residual(name)}
    ranks: dict[str, int] = {}
    for name, residual in state.items():
        if not is_residual(name):
            continue
        module = name.removesuffix(RESIDUAL_SUFFIX)
        u, s, vh = torch.linalg.svd(residual.to(torch.float64), full_matrices=False)  # (o, m), (m,), (m, i)
        keep = int((s > _DEAD * float(s.max().clamp_min(1e-300))).sum()) if s.numel() and float(s.max()) > 0 else 0
        root = s[:keep].sqrt()
        b_name, a_name = module + ".lora_B.weight", module + ".lora_A.weight"
        out[b_name] = torch.cat([out[b_name], (u[:, :keep] * root).to(torch.float32)], dim=1)
        out[a_name] = torch.cat([out[a_name], (root[:, None] * vh[:keep]).to(torch.float32)], dim=0)
        ranks[module] = rank + keep
    return out, ranks


def save_with_residuals(model: PeftModel, state: Mapping[str, torch.Tensor], out_dir: Path) -> dict[str, int]:
    """Save ``state`` (with residuals) as a peft LoRA adapter folder whose modules carry their residual as extra
    rank (:func:`fold_residuals`); returns each module's saved rank."""
    config = copy.deepcopy(model.peft_config["default"])
    rank, alpha = int(config.r), float(config.lora_alpha)  # type: ignore[attr-defined]  # a LoraConfig
    tensors, ranks = fold_residuals(state, rank)
    prefix = "base_model.model."
    rank_pattern = dict(config.rank_pattern or {})  # type: ignore[attr-defined]
    alpha_pattern = dict(config.alpha_pattern or {})  # type: ignore[attr-defined]
    for module, new_rank in ranks.items():
        key = re.escape(module.removeprefix(prefix))  # peft matches patterns as regular expressions
        rank_pattern[key] = new_rank
        alpha_pattern[key] = alpha * new_rank / rank  # alpha' / r' = alpha / r: the same scale on every component
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern  # type: ignore[attr-defined]
    config.inference_mode = True
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(out_dir / "adapter_model.safetensors"))
    return ranks
