"""`fedlm audit` end to end on the tiny model: a deliberately overfit run is clearly attackable (AUC > 0.5); the same
run under strong client-level DP is not (AUC near 0.5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config, write_config
from typer.testing import CliRunner

from fedlm.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _overfit_audit(runner, root: Path, **extra: dict) -> dict:
    """The deliberately overfit tiny run (4 rounds x 80 local steps on 24 examples per client), then
    `fedlm audit --client 0`: its audit.json."""
    config = tiny_config(
        root / "run",
        peft={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        data={"max_train_examples": 48, "max_length": 128},
        partition={"method": "iid", "num_clients": 2, "field": None},
        federation={"rounds": 4, "clients_per_round": 2, "local_steps": 80, "batch_size": 8, "lr": 0.005},
        eval={"every": 0, "generate": False, "max_examples": 24},
        **extra,
    )
    assert runner.invoke(app, ["run", str(write_config(root / "c.yaml", config))]).exit_code == 0
    result = runner.invoke(app, ["audit", str(root / "run"), "--client", "0", "--max-examples", "24"])
    assert result.exit_code == 0, result.output
    return json.loads((root / "run" / "audit.json").read_text())


@pytest.fixture(scope="module")
def overfit_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _overfit_audit(CliRunner(), tmp_path_factory.mktemp("overfit"))


def test_an_overfit_run_leaks_membership(overfit_report: dict) -> None:
    report = overfit_report
    assert report["loss"]["auc"] > 0.8, report  # measured 0.96; chance is 0.5, the AUC's SE at 24 + 24 is ~0.08
    assert report["examples_per_set"] == 24 and report["epsilon"] is None


def test_strong_client_dp_pulls_the_attack_toward_chance(runner, tmp_path: Path, overfit_report: dict) -> None:
    """The same run under strong client-level DP (clip 0.01, noise multiplier 5; McMahan et al. 2018): the released
    global model barely moves from the base, so the loss attack is near chance."""
    report = _overfit_audit(runner, tmp_path, privacy={"client_dp": {"noise_multiplier": 5.0, "clip": 0.01}})
    assert report["epsilon"] is not None and report["epsilon"] < 5 and report["delta"] == 1e-5
    assert abs(report["loss"]["auc"] - 0.5) < 0.12, report  # measured 0.44 (the SE at 24 + 24 is ~0.08)
    assert report["loss"]["auc"] < overfit_report["loss"]["auc"] - 0.3  # measured 0.96 without DP
    section = (tmp_path / "run" / "report.md").read_text().split("## Privacy audit")[1]  # `fedlm audit` rewrote the report
    assert f"epsilon {report['epsilon']:.4g} at delta 1e-05" in section and "| global | loss |" in section


def test_audit_of_a_folder_without_a_run_is_refused(runner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(tmp_path)])
    assert result.exit_code == 2 and "holds no finished fedlm run" in result.output
