"""Every personalization method from the CLI on the real default model (SmolLM2-135M-Instruct). Run: pytest -m slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config, write_config

from fedlm.cli import app

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["finetune", "fedsa", "ditto", "dual", "prompt"])
def test_method_runs_on_smollm2(tmp_path: Path, runner, method: str) -> None:
    config = tiny_config(
        tmp_path / "run",
        model={"name": "smollm2-135m-instruct", "dtype": "float32"},
        peft={"r": 4, "alpha": 8, "dropout": 0.0},
        data={"max_train_examples": 64, "max_length": 96},
        federation={"rounds": 1, "clients_per_round": 2, "local_steps": 1, "batch_size": 2, "lr": 0.002},
        eval={"max_examples": 8, "generate": False, "batch_size": 8, "at_start": False},
        personalization={"method": method, "local_steps": 1},
    )
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 0, result.output
    clients = sorted(p.name for p in (tmp_path / "run" / "clients").iterdir())
    assert clients
    for client in clients:
        folder = tmp_path / "run" / "clients" / client
        assert json.loads((folder / "personal.json").read_text())["method"] == method
        assert (folder / "adapter" / "adapter_config.json").is_file() and (folder / "profile.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "personal" and r["model"] == "personal" for r in records)
