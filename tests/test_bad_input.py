"""Bad input: one clear line naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config, write_config

from fedlm.cli import app


def _run(runner, tmp_path: Path, **sections) -> str:
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", **sections))
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return result.output


def test_missing_data_file(runner, tmp_path: Path) -> None:
    out = _run(runner, tmp_path, data={"train": str(tmp_path / "missing.jsonl")})
    assert "`data.train`" in out and "does not exist" in out


def test_unknown_model_alias(runner, tmp_path: Path) -> None:
    out = _run(runner, tmp_path, model={"name": "smollm3"})
    assert "`model.name` 'smollm3' is not a known alias" in out


def test_dataset_without_needed_columns(runner, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a", "domain": "x"}) + "\n")
    out = _run(runner, tmp_path, data={"train": str(path), "test": str(path)})
    assert "`instruction` and `output`" in out and "question" in out


def test_clients_per_round_larger_than_clients(runner, tmp_path: Path) -> None:
    out = _run(runner, tmp_path, federation={"clients_per_round": 9})
    assert "`federation.clients_per_round` must be <= the number of clients (8), got 9" in out


def test_empty_client_partition(runner, tmp_path: Path) -> None:
    out = _run(runner, tmp_path, partition={"method": "dirichlet", "num_clients": 8, "alpha": 0.01, "field": "domain"})
    assert "got no training examples" in out and "partition.alpha" in out


def test_nan_loss_stops_with_a_fix(runner, tmp_path: Path) -> None:
    out = _run(runner, tmp_path, federation={"lr": 1.0e30, "max_grad_norm": None})
    assert "non-finite loss" in out and "lower `federation.lr`" in out


def test_debug_shows_the_traceback(runner, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", model={"name": "smollm3"}))
    result = runner.invoke(app, ["run", str(cfg), "--debug"])
    assert result.exit_code != 0
    assert result.exception is not None


@pytest.mark.parametrize("flag", [["--resume"], ["--resume", "--overwrite"]])
def test_resume_without_a_run_is_refused(runner, tmp_path: Path, flag: list[str]) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    result = runner.invoke(app, ["run", str(cfg), *flag])
    assert result.exit_code == 2 and "error:" in result.output
