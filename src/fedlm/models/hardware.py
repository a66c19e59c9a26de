"""Where the model runs and how its frozen base is stored: ``model.device``, ``model.quantization``,
``model.attn_implementation`` and ``model.gradient_checkpointing``.

Each knob has a ``*_refusal`` function that returns why the setting cannot run on this machine (with the fix), or
None; the config rules (:mod:`fedlm.config.rules`) call them at load, so a bad setting is refused before any model
loads, never with a CUDA traceback in the middle of a round.

Quantization (QLoRA, Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): the frozen base's linear
layers are stored in 4-bit NormalFloat (NF4, their Sec. 3) with double quantization of the block scales, and computed
in ``model.dtype`` (the compute dtype); ``8bit`` is LLM.int8() (Dettmers et al. 2022). Both through ``bitsandbytes``,
whose CPU backend (since 0.48) and CUDA backend both run them. Adapters, their gradients and every update stay
float32; the embeddings, norms and LM head are not quantized (``prepare_model_for_kbit_training`` keeps them float32).
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import torch

from fedlm.core.errors import FedlmError

#: The bitsandbytes release fedlm pins (pyproject.toml); its CPU backend runs NF4 and int8.
BNB_PIN = "bitsandbytes==0.50.2"
#: The device types whose bitsandbytes backend fedlm has run 4-bit and 8-bit training on.
BNB_DEVICE_TYPES = ("cpu", "cuda")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:(\d+))$")


def device_refusal(name: str) -> str | None:
    """Why ``model.device: name`` cannot run here (with the fix), or None."""
    match = _DEVICE.match(name)
    if match is None:
        return f"`model.device` must be auto, cpu, cuda or cuda:N, got {name!r}"
    if not name.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return (
            f"`model.device: {name}` but no CUDA GPU is visible (torch {torch.__version__}, {build}); "
            "use `model.device: cpu` or `auto` (CUDA when there is a GPU, else CPU), or install a CUDA build of torch"
        )
    index, count = match.group(2), torch.cuda.device_count()
    if index is not None and int(index) >= count:
        return f"`model.device: {name}` but this machine has {count} GPU(s) (cuda:0..cuda:{count - 1}); pick one of them or `cuda`"
    return None


def resolve_device(name: str = "auto") -> torch.device:
    """``model.device`` as a torch device: ``auto`` is the GPU when one is visible, else the CPU; refuses an unusable one."""
    reason = device_refusal(name)
    if reason is not None:
        raise FedlmError(reason)
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def engine_refusal(num_cpus: float, num_gpus: float, ray_cpus: int | None, address: str | None, device: str) -> str | None:
    """Why ``federation.simulation_engine`` (Flower's simulation engine on Ray, ``num_cpus``/``num_gpus`` per
    client worker) cannot run with ``model.device: device`` (with the fix), or None. Ray hides the GPUs from a
    worker that reserves none and shows a worker its own GPU as ``cuda:0``. With ``address`` (a Ray cluster) the
    machine's own cores and GPUs do not count; the cluster's are checked when the run connects."""
    field = "`federation.simulation_engine"
    if num_gpus > 1 and num_gpus != int(num_gpus):
        return f"{field}.num_gpus` above 1 must be a whole number of GPUs (Ray's rule), got {num_gpus:g}; use e.g. 1, 2 or 0.5"
    if num_gpus == 0 and device.startswith("cuda"):
        return (
            f"`model.device: {device}` but {field}.num_gpus` is 0, so Ray hides the GPUs from the clients' workers; "
            f"give each client a GPU share ({field}.num_gpus: 0.5`) or use `model.device: auto`"
        )
    if num_gpus > 0 and device.startswith("cuda:"):
        return f"`model.device: {device}` cannot be pinned on the simulation engine: Ray shows each worker its own GPU as cuda:0; use `model.device: cuda` or auto"
    if num_gpus > 0 and device == "cpu":
        return f"{field}.num_gpus: {num_gpus:g}` reserves GPUs that `model.device: cpu` never uses; set it to 0"
    if address is not None:
        if ray_cpus is not None:
            return f"{field}.ray_cpus` sizes a Ray started on this machine; with `address` ({address}) the cluster's nodes have their cores: drop one of them"
        return None
    cores = os.cpu_count() or 1
    if ray_cpus is not None and ray_cpus > cores:
        return f"{field}.ray_cpus: {ray_cpus}` but this machine has {cores} CPU cores; use at most {cores} (or join a Ray cluster with `address`)"
    usable = ray_cpus or cores
    if num_cpus > usable:
        return (
            f"{field}.num_cpus: {num_cpus:g}` per client but Ray has {usable} CPU cores here, so no client could run; "
            f"use at most {usable}, or join a bigger Ray cluster with {field}.address`"
        )
    if num_gpus > 0:
        count = torch.cuda.device_count()
        if count == 0:
            return (
                f"{field}.num_gpus: {num_gpus:g}` but no CUDA GPU is visible to torch ({torch.__version__}); set it to 0 to train "
                f"on the CPU, or join a Ray cluster with GPUs ({field}.address`)"
            )
        if num_gpus > count:
            return f"{field}.num_gpus: {num_gpus:g}` per client but this machine has {count} GPU(s); use at most {count} (0.5: two clients per GPU)"
    return None


def bitsandbytes_version() -> str | None:
    """The installed bitsandbytes version, or None (found without importing it)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    from importlib.metadata import version  # noqa: PLC0415

    return version("bitsandbytes")


def quantization_refusal(mode: str, device: torch.device) -> str | None:
    """Why ``model.quantization: mode`` cannot run on ``device`` (with the fix), or None."""
    if mode == "none":
        return None
    installed = bitsandbytes_version()
    if installed is None:
        return f"`model.quantization: {mode}` needs the package bitsandbytes; install it with `pip install --no-deps {BNB_PIN}`"
    major_minor = tuple(int(p) for p in installed.split(".")[:2])
    if device.type == "cpu" and major_minor < (0, 48):
        return (
            f"`model.quantization: {mode}` on the CPU needs bitsandbytes >= 0.48 (its CPU backend), got {installed}; "
            f"`pip install --no-deps {BNB_PIN}`, or use `model.quantization: none`"
        )
    if device.type not in BNB_DEVICE_TYPES:
        return f"`model.quantization: {mode}` runs on cpu or cuda (bitsandbytes), not {device.type}; use `model.quantization: none`"
    return None


def attn_refusal(implementation: str, device: torch.device) -> str | None:
    """Why ``model.attn_implementation`` cannot run on ``device`` (with the fix), or None."""
    if implementation != "flash_attention_2":
        return None
    if device.type != "cuda":
        return (
            f"`model.attn_implementation: flash_attention_2` runs on CUDA GPUs only, and the model runs on {device}; "
            "use `model.attn_implementation: sdpa` (the default)"
        )
    if importlib.util.find_spec("flash_attn") is None:
        return (
            "`model.attn_implementation: flash_attention_2` needs the package flash-attn, which is not installed; "
            "install it (`pip install flash-attn --no-build-isolation`) or use `model.attn_implementation: sdpa`"
        )
    return None


def quantization_config(mode: str, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``mode`` (``4bit``: NF4, double quantization, ``compute_dtype``;
    ``8bit``: LLM.int8()), or None for ``none``."""
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig  # noqa: PLC0415 - imports bitsandbytes lazily

    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise FedlmError(f"`model.quantization` must be none, 8bit or 4bit, got {mode!r}")


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them (Chen et al. 2016).

    Non-reentrant checkpointing (``use_reentrant=False``) gives gradients to the adapters inside a frozen base and
    restores the RNG state, so dropout draws the same masks in the recomputation; the input-embedding hook makes the
    embeddings' output require grad for the methods whose trainable tensors sit before the first layer (prompt tuning).
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})  # was gradient_checkpointing_enable
    model.enable_input_require_grads()
