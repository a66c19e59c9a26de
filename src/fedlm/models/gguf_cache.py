"""Converting a GGUF checkpoint once into a safetensors folder, so later loads take about a second.

transformers' GGUF loader de-quantizes every tensor on each load (~20 s for SmolLM2-135M on 2 cores); the cache
keeps the de-quantized float32 weights, the config and the tokenizer in ``$FEDLM_CACHE`` (default
``~/.cache/fedlm``), keyed by the GGUF file's name, size and modification time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer

_DONE_MARKER = "fedlm-converted"


def cache_root() -> Path:
    """The fedlm cache folder: ``$FEDLM_CACHE`` or ``~/.cache/fedlm``."""
    return Path(os.environ.get("FEDLM_CACHE", Path.home() / ".cache" / "fedlm"))


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Where the converted copy of ``gguf_path`` lives (changes when the file changes)."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{digest}"


def ensure_converted(gguf_path: Path) -> Path:
    """Return a ``from_pretrained``-loadable folder for ``gguf_path``, converting it on first use.

    The conversion writes into a temporary folder that is renamed into place at the end, so an interrupted
    conversion never leaves a half-written cache behind.
    """
    target = gguf_cache_dir(gguf_path)
    if (target / _DONE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / _DONE_MARKER).write_text(str(gguf_path))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
