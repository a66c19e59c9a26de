"""Choosing the compute dtype: bfloat16 only where the hardware makes it fast.

``model.dtype: auto`` resolves to bfloat16 on a GPU that supports it and on a CPU with bfloat16 matrix instructions
(:func:`cpu_has_fast_bf16`), else to float32. The environment variable ``FEDLM_AUTO_DTYPE`` (``float32`` or
``bfloat16``) overrides that choice on any machine, without touching configs: the test suite pins it so that no test
depends on the CPU it runs on. An explicit ``model.dtype: float32|bfloat16`` is never overridden.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fedlm.core.errors import FedlmError

_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_CPUINFO = Path("/proc/cpuinfo")
#: What ``model.dtype: auto`` resolves to when set (float32 | bfloat16), instead of probing the hardware.
AUTO_DTYPE_ENV = "FEDLM_AUTO_DTYPE"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_has_fast_bf16(cpuinfo: Path = _CPUINFO) -> bool:
    """True when the CPU has bfloat16 matrix instructions (AMX or AVX512-BF16).

    Without them PyTorch emulates bf16 matmuls, which is ~100x slower than float32 (measured on an AVX2 EPYC:
    1 GFLOP/s vs 86 GFLOP/s for a 1024x1024 matmul).
    """
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


def auto_dtype_override() -> torch.dtype | None:
    """The dtype ``FEDLM_AUTO_DTYPE`` forces ``auto`` to (None when unset or empty); any other value is refused."""
    value = os.environ.get(AUTO_DTYPE_ENV, "").strip()
    if not value:
        return None
    if value not in _DTYPES:
        raise FedlmError(f"environment variable {AUTO_DTYPE_ENV} must be float32 or bfloat16 (or unset), got {value!r}")
    return _DTYPES[value]


def resolve_dtype(name: str, device: torch.device, cpuinfo: Path = _CPUINFO) -> torch.dtype:
    """Map ``model.dtype`` (auto | float32 | bfloat16) to a torch dtype for ``device``; ``auto`` follows
    ``FEDLM_AUTO_DTYPE`` when it is set, else the hardware (on a CPU, the flags in ``cpuinfo``)."""
    if name in _DTYPES:
        return _DTYPES[name]
    if name != "auto":
        raise FedlmError(f"`model.dtype` must be auto, float32 or bfloat16, got {name!r}")
    override = auto_dtype_override()
    if override is not None:
        return override
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16(cpuinfo) else torch.float32
