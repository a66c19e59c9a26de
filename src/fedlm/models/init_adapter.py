"""``model.init_adapter``: start a run's global adapter from an earlier run's ``adapter/`` (chaining stages).

Pre-training -> SFT -> DPO is three configs and three commands: each stage names the previous run's
``RUN_DIR/adapter`` as ``model.init_adapter``, with the same ``model.name`` and the same ``peft`` method and shapes.
The whole saved adapter is loaded into the model, frozen parts included (FFA-LoRA's A), and the run's starting
global state is its trainable part. For ``peft.method: full`` the folder is a full run's ``adapter/`` (a Hugging
Face model folder). To start from *merged* weights instead (any method on top of them), point ``model.name`` at a
merged model folder (``fedlm export --merge RUN_DIR OUT_DIR``, or a full run's ``adapter/``).

Checked twice: at config load against the folder's ``adapter_config.json`` (method, rank, alpha, targets, virtual
tokens), and when the session is built against the model's own tensors (every name and shape).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from fedlm.config.schema import ExperimentConfig, PeftConfig
from fedlm.core.errors import FedlmError
from fedlm.models.adapters import load_trainable_state, named_trainable_parameters, peft_method_config

_PEFT_FILE = "adapter_model.safetensors"
_FIELD = "`model.init_adapter`"
_METHOD_OF_TYPE = {"IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning"}


def check_init_adapter(config: ExperimentConfig) -> None:
    """Config-load check: the folder exists, is the right kind, and was trained with the same peft settings."""
    path = Path(config.model.init_adapter or "")
    if not path.is_dir():
        raise FedlmError(f"{_FIELD} {str(path)!r} is not a folder; point it at an earlier run's `adapter/` folder")
    if config.peft.method == "full":
        if not list(path.glob("model*.safetensors")):
            raise FedlmError(
                f"{_FIELD} {str(path)!r} holds no model*.safetensors; with `peft.method: full` it must be a full run's "
                "`adapter/` folder (a Hugging Face model folder)"
            )
        return
    if not (path / "adapter_config.json").is_file():
        hint = " it is a full model folder: start from it with `model.name` instead" if (path / "config.json").is_file() else ""
        raise FedlmError(f"{_FIELD} {str(path)!r} has no adapter_config.json, so it is no peft adapter;{hint or ' check the path'}")
    saved = adapter_settings(json.loads((path / "adapter_config.json").read_text()))
    ours = adapter_settings(peft_method_config(config.peft).to_dict())
    if config.peft.target_modules == "all-linear":  # peft saves the expanded list; the tensor check compares them
        saved.pop("target_modules", None)
        ours.pop("target_modules", None)
    if saved != ours:
        raise FedlmError(
            f"{_FIELD} {str(path)!r} was trained with peft {_settings_text(path, saved)}, but this config has "
            f"`peft` {_config_text(config.peft)}; use the earlier run's `peft` settings, or drop `model.init_adapter`"
        )


def adapter_settings(peft_dict: dict[str, Any]) -> dict[str, Any]:
    """The settings of a peft config (``adapter_config.json`` or ``PeftConfig.to_dict()``) that fix what the adapter
    computes: method, rank, alpha, targets (as sorted lists) and virtual tokens."""
    peft_type = str(peft_dict.get("peft_type", "")).removeprefix("PeftType.")
    if peft_type == "LORA":
        method = "dora" if peft_dict.get("use_dora") else "lora"
        keys: tuple[str, ...] = ("r", "lora_alpha", "target_modules")
    else:
        method = _METHOD_OF_TYPE.get(peft_type, peft_type.lower())
        keys = ("target_modules", "feedforward_modules") if method == "ia3" else ("num_virtual_tokens",)
    out: dict[str, Any] = {"method": method}
    for key in keys:
        value = peft_dict.get(key)
        out[key] = sorted(value) if isinstance(value, (list, set, tuple)) else value
    if "lora_alpha" in out:
        out["lora_alpha"] = float(out["lora_alpha"])
    return out


def load_init_adapter(model: torch.nn.Module, peft: PeftConfig, path: Path) -> None:
    """Load the adapter at ``path`` into ``model`` (every tensor, frozen ones included), refusing any name or shape
    that differs from the model's own adapter."""
    if isinstance(model, PeftModel):
        file = path / _PEFT_FILE
        if not file.is_file():
            raise FedlmError(f"{_FIELD} {str(path)!r} has no {_PEFT_FILE}; save adapters as safetensors (peft's default)")
        state = load_file(str(file))
        expected = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(model).items()}
    else:
        state = {}
        for file in sorted(path.glob("model*.safetensors")):
            state.update(load_file(str(file)))
        expected = {name: tuple(p.shape) for name, p in named_trainable_parameters(model).items()}
    got = {name: tuple(t.shape) for name, t in state.items()}
    if got != expected:
        raise FedlmError(
            f"{_FIELD} {str(path)!r} does not fit this model's adapter (`peft` {_config_text(peft)}): "
            f"{_first_difference(got, expected)}; it was trained with peft {_settings_text(path, None)}. "
            "Use the same `model.name` and `peft` settings as the earlier run"
        )
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, state)
    else:
        load_trainable_state(model, state)


def _first_difference(got: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str:
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        return f"{len(missing)} tensors missing (e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})"
    name = next(n for n in sorted(got) if got[n] != expected[n])
    return f"tensor {name} has shape {got[name]} in the folder but {expected[name]} here"


_APPLIES = {
    "lora": ("r", "alpha", "target_modules"),
    "dora": ("r", "alpha", "target_modules"),
    "ia3": ("target_modules", "feedforward_modules"),
    "prompt_tuning": ("num_virtual_tokens",),
    "prefix_tuning": ("num_virtual_tokens",),
}


def _peft_text(peft: dict[str, Any]) -> str:
    """A ``peft`` section as JSON with only the fields that fix the adapter's tensors and function."""
    method = peft.get("method", "lora")
    return json.dumps({"method": method, **{k: peft.get(k) for k in _APPLIES.get(method, ())}})


def _config_text(peft: PeftConfig) -> str:
    return _peft_text(peft.model_dump(mode="json"))


def _settings_text(path: Path, saved: dict[str, Any] | None) -> str:
    """The earlier run's ``peft`` section when ``path`` is a run's ``adapter/`` (its ``config.yaml`` beside it),
    else what the folder's own ``adapter_config.json`` says."""
    run_config = path.parent / "config.yaml"
    if run_config.is_file():
        try:
            return "(that run's `peft`) " + _peft_text((yaml.safe_load(run_config.read_text()) or {}).get("peft") or {})
        except (yaml.YAMLError, AttributeError):
            pass
    if saved is None and (path / "adapter_config.json").is_file():
        saved = adapter_settings(json.loads((path / "adapter_config.json").read_text()))
    return json.dumps(saved) if saved is not None else "unknown settings"
