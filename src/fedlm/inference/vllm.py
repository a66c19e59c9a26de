"""``fedlm serve --engine vllm``: the same adapters through vLLM's multi-LoRA server (CUDA only).

vLLM serves a base model folder with LoRA adapters named per request (``--enable-lora --lora-modules name=path``):
``global`` and ``client/<name>`` for clients whose personal adapter is a whole personal model (``combine: replace``).
The ``adapter`` and ``logits`` mixes, and FedDPA's dual adapters, need fedlm's own engine (the default).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from fedlm.core.errors import FedlmError
from fedlm.inference.run import GLOBAL
from fedlm.models.loading import resolve_model_source
from fedlm.models.tiny import TINY_ALIAS


def vllm_refusal(peft_method: str, model_name: str) -> str | None:
    """Why ``--engine vllm`` cannot run here (None when it can)."""
    if importlib.util.find_spec("vllm") is None:
        return "`--engine vllm` needs the vllm package (pip install vllm), which is not installed; use the default `--engine native`"
    if not torch.cuda.is_available():
        return "`--engine vllm` needs a CUDA GPU and none is visible; use the default `--engine native`"
    if peft_method != "lora":
        return f"`--engine vllm` serves LoRA adapters; this run's `peft.method` is {peft_method!r}: use `--engine native`"
    if model_name == TINY_ALIAS:
        return f"`--engine vllm` loads a model folder; `model.name: {TINY_ALIAS}` is built in code: use `--engine native`"
    return None


def vllm_command(run_dir: Path, model_name: str, rank: int, host: str, port: int, api_key: str | None) -> list[str]:
    """The command line of vLLM's OpenAI server for ``run_dir``'s global and replace-type client adapters."""
    modules = [f"{GLOBAL}={run_dir / 'adapter'}"]
    for folder in sorted((run_dir / "clients").glob("*/adapter")):
        personal = folder.parent / "personal.json"
        if personal.is_file() and '"dual"' in personal.read_text():
            raise FedlmError(f"client {folder.parent.name!r} has a dual (FedDPA) local adapter, which vLLM cannot stack: use `--engine native`")
        modules.append(f"client/{folder.parent.name}={folder}")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model_source(model_name))]
    command += ["--enable-lora", "--max-loras", str(len(modules)), "--max-lora-rank", str(rank), "--lora-modules", *modules]
    command += ["--host", host, "--port", str(port)] + (["--api-key", api_key] if api_key else [])
    return command
