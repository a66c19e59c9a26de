"""Opening a suspect model for verification: a run folder, a peft adapter folder, or a merged model folder.

- a run folder (``config.yaml`` and ``adapter/``): the run's base model (as the run built it: same config and seed)
  with its global adapter;
- an adapter folder (``adapter_config.json``, e.g. ``RUN_DIR/watermark/<client>/`` or a stolen copy): on the base
  named by ``--model``, else by the run folder it lies in, else by the adapter's own ``base_model_name_or_path``;
- a model folder (``config.json``: ``fedlm export --merge``'s output, or any Hugging Face model folder).

Everything is computed in float32 on the full-precision base, whatever the run trained in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlm.config.io import load_config
from fedlm.config.schema import ExperimentConfig, ModelConfig
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.models.loading import load_base_model


@dataclass
class Suspect:
    """A model opened for verification, what kind of folder it came from, and the run folder it lies in (if any)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    kind: str  # run | adapter | model
    run_root: Path | None = None
    config: ExperimentConfig | None = None


def is_run(folder: Path) -> bool:
    """A finished fedlm run folder."""
    return (folder / "config.yaml").is_file() and (folder / "adapter").is_dir()


def enclosing_run(folder: Path) -> Path | None:
    """The run folder that holds ``folder`` (itself, or up to three levels up), or None."""
    for candidate in [folder, *list(folder.resolve().parents)[:3]]:
        if is_run(candidate):
            return candidate
    return None


def _base(model: ModelConfig) -> ModelConfig:
    """``model`` loaded in float32 at full precision, where ``auto`` points."""
    return model.model_copy(update={"dtype": "float32", "quantization": "none", "gradient_checkpointing": False, "device": "auto"})


def open_suspect(path: Path, base_name: str | None = None, trainable: bool = False) -> Suspect:
    """Open ``path`` (a run, adapter or model folder) for verification (``trainable``: with the adapter's weights
    trainable, for a removal attack); a folder of none of these kinds, or an adapter that does not fit its base, is a
    :class:`FedlmError`."""
    if not path.is_dir():
        raise FedlmError(f"{path} is not a folder; give a run folder, a peft adapter folder or a merged model folder")
    if is_run(path):
        config = load_config(path / "config.yaml")
        if config.peft.method == "full":  # adapter/ is a whole model folder
            return _open_model(path / "adapter", "run", path, config)
        return _open_adapter(path / "adapter", base_name, path, config, "run", trainable)
    if (path / "adapter_config.json").is_file():
        run = enclosing_run(path)
        return _open_adapter(path, base_name, run, load_config(run / "config.yaml") if run is not None else None, "adapter", trainable)
    if (path / "config.json").is_file():
        return _open_model(path, "model", None, None)
    raise FedlmError(
        f"{path} is neither a fedlm run folder (config.yaml, adapter/), a peft adapter folder (adapter_config.json) nor a model folder (config.json)"
    )


def _open_model(folder: Path, kind: str, run: Path | None, config: ExperimentConfig | None) -> Suspect:
    loaded = load_base_model(_base(ModelConfig(name=str(folder))))
    loaded.model.eval()
    return Suspect(loaded.model, loaded.tokenizer, loaded.device, kind, run, config)


def _open_adapter(
    folder: Path, base_name: str | None, run: Path | None, config: ExperimentConfig | None, kind: str, trainable: bool = False
) -> Suspect:
    """The adapter in ``folder`` on its base model (``base_name``, else the run's ``model``, else the adapter's own)."""
    if base_name is not None:
        model_config, seed = ModelConfig(name=base_name), 0
        if config is not None and config.model.name == base_name:
            model_config, seed = config.model, config.seed
    elif config is not None:
        model_config, seed = config.model, config.seed
    else:
        declared = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not declared:
            raise FedlmError(f"{folder}: the adapter names no base model and lies in no run folder; pass its base with --model NAME")
        model_config, seed = ModelConfig(name=str(declared)), 0
    loaded = load_base_model(_base(model_config), seed=derive_seed(seed, "base-init") % 2**31)  # as build_session does
    try:
        model = PeftModel.from_pretrained(loaded.model, str(folder), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedlmError(
            f"{folder}: the adapter does not fit base model {model_config.name!r} (another base, or not its adapter layout): {reason}"
        ) from None
    model.eval()
    return Suspect(model, loaded.tokenizer, loaded.device, kind, run, config)
