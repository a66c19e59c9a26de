"""Shared fixtures: a tiny-model experiment config and a CLI runner."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fedlm never downloads in its tests: the hub and `datasets` stay offline (lm-eval tasks read local files only).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# `model.dtype: auto` would otherwise follow this machine's CPU (bfloat16 with AVX512-BF16/AMX, else float32): pin it,
# so that no test depends on the CPU it meets. Tests whose result depends on the compute dtype set `model.dtype`
# explicitly and run under both (the DTYPES parametrization below).
os.environ["FEDLM_AUTO_DTYPE"] = "float32"

#: The compute dtypes that dtype-sensitive tests run under, whatever the CPU (bfloat16 is emulated, slower, without
#: AVX512-BF16: such tests use the tiny model).
DTYPES = ("float32", "bfloat16")


def tiny_config(output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config for the tiny random model on a slice of the embedded data; seconds per run."""
    config: dict[str, Any] = {
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"name": "tiny-random-llama"},
        "peft": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"max_train_examples": 240, "max_length": 128},
        "partition": {"method": "by_field", "field": "domain"},
        "federation": {"rounds": 2, "clients_per_round": 3, "local_steps": 2, "batch_size": 4, "lr": 0.003},
        "eval": {"max_examples": 16, "max_new_tokens": 6, "batch_size": 8},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **values}
        else:
            config[name] = values
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write ``config`` as YAML and return its path."""
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def runner() -> CliRunner:
    """Typer's CLI runner."""
    return CliRunner()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny-model CLI runs: faster than two on a small shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
