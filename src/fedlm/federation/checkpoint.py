"""Resumable checkpoints: the global adapter, the aggregator state, the round, RNG state and the config.

Each checkpoint is a folder ``checkpoints/round_NNNN`` written in a temporary folder and renamed into place, so
a crash never leaves a half-written checkpoint that looks complete. All randomness in fedlm is derived from the
config seed, the round and the client (``fedlm.core.seeding``), so the round number is all the RNG state a resumed
run needs; torch's global RNG state is saved too, for code outside fedlm that uses it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedlm.core.update import TensorDict

_ADAPTER = "global_adapter.safetensors"
_AGGREGATOR = "aggregator_state.pt"
_META = "state.json"
_PREFIX = "round_"


@dataclass
class Checkpoint:
    """Everything needed to continue a run after ``round``."""

    round: int
    global_state: TensorDict
    aggregator_state: dict[str, Any]
    extra: dict[str, Any]


def save_checkpoint(root: Path, checkpoint: Checkpoint, config_yaml: str, keep: int) -> Path:
    """Write ``root/round_NNNN`` atomically, then delete all but the newest ``keep`` checkpoints.

    The global state is saved bit for bit in the dtype it is held in (float32 for peft adapters; a ``full`` run's
    weights in the compute dtype, bfloat16 included), so a resumed run continues exactly."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{_PREFIX}{checkpoint.round:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file({k: v.contiguous() for k, v in checkpoint.global_state.items()}, str(tmp / _ADAPTER))
        torch.save({"aggregator": checkpoint.aggregator_state, "torch_rng": torch.get_rng_state()}, tmp / _AGGREGATOR)
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / _META).write_text(json.dumps({"round": checkpoint.round, **checkpoint.extra}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return target


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / _META).is_file()]
    return sorted(done, key=lambda p: int(p.name.removeprefix(_PREFIX)))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`."""
    meta = json.loads((path / _META).read_text())
    blob = torch.load(path / _AGGREGATOR, weights_only=False)
    round_num = int(meta.pop("round"))
    return Checkpoint(round=round_num, global_state=load_file(str(path / _ADAPTER)), aggregator_state=blob["aggregator"], extra=meta)
