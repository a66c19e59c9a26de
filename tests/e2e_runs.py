"""What the end-to-end tests through ``fedlm run`` share: a tiny run written and run through the CLI, its metrics
records and its final adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from conftest import tiny_config, write_config
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlm.cli import app

#: a small loss-only evaluation at the end only
EVAL = {"every": 0, "generate": False, "max_examples": 8}
#: 2 rounds of 1 local step
FAST = {"rounds": 2, "local_steps": 1}


def run_tiny(root: Path, *, extra_args: tuple[str, ...] = (), **sections: dict[str, Any]) -> Path:
    """Write a tiny config under ``root`` (output ``root/run``; ``EVAL`` and ``FAST`` unless ``sections`` say
    otherwise), run it through the CLI, return the run folder."""
    sections = {"eval": EVAL, **sections}
    sections["federation"] = {**FAST, **sections.get("federation", {})}
    root.mkdir(parents=True, exist_ok=True)
    cfg = write_config(root / "c.yaml", tiny_config(root / "run", **sections))
    result = CliRunner().invoke(app, ["run", str(cfg), *extra_args])
    assert result.exit_code == 0, result.output
    return root / "run"


def split_records(run: Path, split: str) -> list[dict[str, Any]]:
    """The records of ``run/metrics.jsonl`` whose split is ``split``."""
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def run_records(run: Path) -> list[dict[str, Any]]:
    """Every record of ``run/metrics.jsonl``."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def final_adapter(run: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``run/adapter/adapter_model.safetensors``."""
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))
