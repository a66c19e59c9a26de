"""A run interrupted after round 1 and resumed ends with the same adapter as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_config
from safetensors.torch import load_file

from fedlm.cli import app
from fedlm.runtime.simulation import SimulationRuntime

SECTIONS = {
    "federation": {"rounds": 3, "clients_per_round": 3, "local_steps": 3, "lr_schedule": "cosine"},
    "eval": {"every": 1, "generate": False, "max_examples": 16},
}


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


@pytest.fixture
def uninterrupted(tmp_path_factory, runner) -> Path:
    root = tmp_path_factory.mktemp("full")
    cfg = write_config(root / "c.yaml", tiny_config(root / "run", **SECTIONS))
    assert runner.invoke(app, ["run", str(cfg)]).exit_code == 0
    return root / "run"


def test_crash_in_round_2_then_resume_gives_the_same_adapter(tmp_path: Path, runner, uninterrupted: Path, monkeypatch) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", **SECTIONS))
    original = SimulationRuntime.train_clients

    def crash_in_round_2(self, tasks):
        if next(iter(tasks.values())).plan.round == 2:
            raise KeyboardInterrupt
        return original(self, tasks)

    monkeypatch.setattr(SimulationRuntime, "train_clients", crash_in_round_2)
    first = runner.invoke(app, ["run", str(cfg)])
    assert first.exit_code == 130 and "--resume" in first.output
    assert not (tmp_path / "run" / "adapter").exists()
    monkeypatch.setattr(SimulationRuntime, "train_clients", original)

    resumed = runner.invoke(app, ["run", str(cfg), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    _assert_same(_adapter(tmp_path / "run"), _adapter(uninterrupted))
    rounds = [json.loads(line)["round"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    full = [json.loads(line)["round"] for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert rounds == full  # nothing logged twice, nothing lost


def test_killed_process_resumes_to_the_same_adapter(tmp_path: Path, uninterrupted: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", **SECTIONS))
    cmd = [sys.executable, "-c", "from fedlm.cli import main; main()", "run", str(cfg)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = tmp_path / "run" / "checkpoints" / "round_0001" / "state.json"
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "round 1 checkpoint never appeared"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (tmp_path / "run" / "adapter").exists(), "the run finished before it could be killed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same(_adapter(tmp_path / "run"), _adapter(uninterrupted))


def test_resume_refuses_a_changed_config(tmp_path: Path, runner, uninterrupted: Path) -> None:
    changed = tiny_config(uninterrupted, **{**SECTIONS, "federation": {**SECTIONS["federation"], "lr": 0.5}})
    cfg = write_config(tmp_path / "c.yaml", changed)
    result = runner.invoke(app, ["run", str(cfg), "--resume"])
    assert result.exit_code == 2 and "federation.lr" in result.output
