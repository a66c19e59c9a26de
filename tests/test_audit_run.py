"""`fedlm audit` end to end on the tiny model: a deliberately overfit run is clearly attackable (AUC > 0.5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_config, write_config
from fedlm.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_an_overfit_run_leaks_membership(runner, tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path / "run",
        peft={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        data={"max_train_examples": 48, "max_length": 128},
        partition={"method": "iid", "num_clients": 2, "field": None},
        federation={"rounds": 4, "clients_per_round": 2, "local_steps": 80, "batch_size": 8, "lr": 0.005},
        eval={"every": 0, "generate": False, "max_examples": 24},
    )
    assert runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))]).exit_code == 0
    result = runner.invoke(app, ["audit", str(tmp_path / "run"), "--client", "0", "--max-examples", "24"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert report["loss"]["auc"] > 0.8, report  # measured 0.96; chance is 0.5, the AUC's SE at 24 + 24 is ~0.08
    assert report["examples_per_set"] == 24 and report["epsilon"] is None


def test_audit_of_a_folder_without_a_run_is_refused(runner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(tmp_path)])
    assert result.exit_code == 2 and "holds no finished fedlm run" in result.output
