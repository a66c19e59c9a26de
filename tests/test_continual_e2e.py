"""A continual run from the CLI on the tiny model: three WordNet domains arriving one per round with rehearsal and
EWC; the accuracy matrix and forgetting in metrics.jsonl and report.md; a run interrupted mid-stream and resumed
ends with the same adapter; a slice the data does not have is refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, write_config
from safetensors.torch import load_file

from fedlm.cli import app
from fedlm.runtime.simulation import SimulationRuntime

SLICES = ["noun.food", "noun.plant", "verb.motion"]
SECTIONS: dict[str, Any] = {
    "data": {"train": "embedded:wordnet_mc", "max_train_examples": 150, "max_length": 96},
    "partition": {"method": "iid", "num_clients": 2},
    "federation": {"rounds": 3, "clients_per_round": 2, "local_steps": 1, "batch_size": 2},
    "eval": {"every": 0, "generate": False, "max_examples": 24},
    "continual": {
        "field": "domain",
        "slices": SLICES,
        "stream": "round",
        "mitigations": ["rehearsal", "ewc"],
        "rehearsal": {"buffer_size": 4},
        "ewc": {"strength": 10.0, "samples": 2},
    },
}


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_torch_thread) -> Path:
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("continual")
    cfg = write_config(root / "c.yaml", tiny_config(root / "run", **SECTIONS))
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    return root / "run"


def test_the_matrix_forgetting_and_client_state_are_written(uninterrupted: Path) -> None:
    records = _records(uninterrupted)
    rows = [r for r in records if r["split"] == "continual"]
    assert sorted({(r["stage"], r["slice"]) for r in rows}) == sorted((k, s) for k in range(4) for s in SLICES)
    assert all(r["loss"] > 0 and 0.0 <= r["mc_accuracy"] <= 1.0 for r in rows)
    summary = {(r["stage"], r["metric"]): r for r in records if r["split"] == "forgetting"}
    assert {k for k, _ in summary} == {1, 2, 3} and summary[(1, "loss")]["forgetting"] is None
    assert summary[(3, "loss")]["forgetting"] is not None and summary[(3, "mc_accuracy")]["bwt"] is not None
    replayed = [r["replayed_examples"] for r in records if r["split"] == "train"]
    assert replayed[:2] == [0.0, 0.0] and all(n > 0 for n in replayed[2:])  # stage 1 has nothing earlier to replay
    report = (uninterrupted / "report.md").read_text()
    assert "## Continual learning: accuracy matrix and forgetting" in report and "| stage | noun.food | noun.plant | verb.motion |" in report
    assert (uninterrupted / "plots" / "continual_loss.png").is_file()
    state = load_file(str(sorted((uninterrupted / "clients" / "0" / "state").iterdir())[-1]))
    assert state["replay.items"].shape == (4, 2) and any(k.startswith("ewc.fisher.") for k in state)


def test_a_run_interrupted_mid_stream_resumes_to_the_same_adapter(tmp_path: Path, runner, uninterrupted: Path, monkeypatch) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", **SECTIONS))
    original = SimulationRuntime.train_clients
    calls = {"n": 0}

    def crash_in_round_3_after_one_client(self, tasks):
        if next(iter(tasks.values())).plan.round == 3:
            calls["n"] += 1
            if calls["n"] == 2:  # the first client of round 3 saved its state; the second never trains
                raise KeyboardInterrupt
        return original(self, tasks)

    monkeypatch.setattr(SimulationRuntime, "train_clients", crash_in_round_3_after_one_client)
    first = runner.invoke(app, ["run", str(cfg)])
    assert first.exit_code == 130, first.output
    monkeypatch.setattr(SimulationRuntime, "train_clients", original)
    resumed = runner.invoke(app, ["run", str(cfg), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(uninterrupted / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    matrix = [(r["stage"], r["slice"], r["loss"]) for r in _records(tmp_path / "run") if r["split"] == "continual"]
    assert matrix == [(r["stage"], r["slice"], r["loss"]) for r in _records(uninterrupted) if r["split"] == "continual"]


def test_a_slice_the_data_lacks_is_refused_naming_the_field(tmp_path: Path, runner, one_torch_thread) -> None:
    sections = {**SECTIONS, "continual": {**SECTIONS["continual"], "slices": ["noun.food", "noun.cheese"]}}
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", **sections))
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code != 0 and "`continual.slices` names slice 'noun.cheese'" in result.output
    assert "Traceback" not in result.output
