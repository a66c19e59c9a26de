"""The attack harness end to end on the tiny model: a scaling attack moves FedAvg far while Krum, the median and
FLTrust keep the model close, defences' catches are logged, a backdoor's success is measured, bad shares are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, write_config
from safetensors.torch import load_file

from fedlm.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ATTACKER = "3"
BASE = {
    "partition": {"method": "iid", "num_clients": 8, "field": None},
    "federation": {"rounds": 2, "clients_per_round": 8, "local_steps": 1, "batch_size": 4, "lr": 0.003},
    "eval": {"every": 0, "generate": False, "max_examples": 8, "at_start": False},
}


def _run(runner, root: Path, name: str, **sections: Any) -> tuple[dict[str, torch.Tensor], list[dict]]:
    merged = {k: {**BASE.get(k, {}), **v} if isinstance(v, dict) else v for k, v in {**BASE, **sections}.items()}
    cfg = write_config(root / f"{name}.yaml", tiny_config(root / name, **merged))
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return load_file(str(root / name / "adapter" / "adapter_model.safetensors")), records


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k] - b[k]).square().sum() for k in a)) ** 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, torch.Tensor], list[dict]]]:
    from typer.testing import CliRunner

    root, runner = tmp_path_factory.mktemp("attacks"), CliRunner()
    scaling = {"name": "scaling", "factor": 100.0, "clients": [ATTACKER]}
    return {
        "clean": _run(runner, root, "clean"),
        "fedavg": _run(runner, root, "fedavg", attack=scaling),
        "krum": _run(runner, root, "krum", attack=scaling, aggregation={"name": "krum", "num_malicious": 1}),
        "median": _run(runner, root, "median", attack=scaling, aggregation={"name": "median"}),
        "fltrust": _run(runner, root, "fltrust", attack=scaling, aggregation={"name": "fltrust", "root_size": 16}),
    }


def test_scaling_moves_fedavg_far_and_robust_aggregators_keep_it_close(runs) -> None:
    clean = runs["clean"][0]
    moved = {name: _distance(runs[name][0], clean) for name in ("fedavg", "krum", "median", "fltrust")}
    for defence in ("krum", "median", "fltrust"):
        assert moved["fedavg"] > 5 * moved[defence], moved


def test_the_attack_and_what_each_defence_caught_are_logged(runs) -> None:
    for name in ("fedavg", "krum"):
        rounds = [r for r in runs[name][1] if r["split"] == "aggregate"]
        assert all(r["attack"]["malicious"] == [ATTACKER] for r in rounds)
        train = [r for r in runs[name][1] if r["split"] == "train" and r["client"] == ATTACKER]
        assert train and all(r["malicious"] == 1.0 for r in train)
    krum_rounds = [r for r in runs["krum"][1] if r["split"] == "aggregate"]
    assert all(r["attack"]["excluded_malicious"] == [ATTACKER] for r in krum_rounds)
    fedavg_rounds = [r for r in runs["fedavg"][1] if r["split"] == "aggregate"]
    assert all(r["attack"]["excluded_malicious"] == [] for r in fedavg_rounds)


def test_a_backdoor_run_measures_attack_success(runner, tmp_path: Path) -> None:
    _, records = _run(
        runner,
        tmp_path,
        "backdoor",
        attack={"name": "backdoor", "clients": [ATTACKER], "poison_fraction": 0.5},
        eval={"every": 1, "generate": False, "max_examples": 8, "at_start": True, "max_new_tokens": 4},
    )
    probes = [r for r in records if r["split"] == "backdoor_test"]
    assert [r["round"] for r in probes] == [0, 1, 2]
    assert all(0.0 <= r["attack_success_rate"] <= 1.0 and r["num_examples"] == 8 for r in probes)
    assert probes[-1]["target_loss"] < probes[0]["target_loss"]  # the target answer became likelier


def test_too_many_attackers_for_krum_are_refused_at_load_with_the_arithmetic(runner, tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "run", **{**BASE, "aggregation": {"name": "krum"}, "attack": {"name": "sign_flip", "fraction": 0.375}})
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 2
    assert "f = 3" in result.output and "K = 8" in result.output and "2f + 2 = 8" in result.output


def test_a_safety_attack_run_measures_the_refusal_rate(runner, tmp_path: Path) -> None:
    _, records = _run(
        runner,
        tmp_path,
        "safety",
        attack={"name": "safety", "clients": [ATTACKER], "mix": 1.0},
        federation={"rounds": 1},
        eval={"every": 1, "generate": False, "max_examples": 8, "at_start": False, "max_new_tokens": 2},
    )
    probes = [r for r in records if r["split"] == "safety_test"]
    assert [r["round"] for r in probes] == [1] and 0.0 <= probes[0]["refusal_rate"] <= 1.0 and probes[0]["num_examples"] == 60
