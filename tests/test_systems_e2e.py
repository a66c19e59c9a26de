"""`fedlm run` with a `systems` section on the tiny model: FedBuff's asynchronous loop and a synchronous run whose
slow clients send partial work before the deadline, both logging simulated and wall seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config, write_config
from safetensors.torch import load_file

from fedlm.cli import app as cli


def _run(runner, root: Path, **sections: Any) -> list[dict[str, Any]]:
    base = {"eval": {"every": 0, "generate": False, "max_examples": 8, "at_start": False}}
    cfg = write_config(root.parent / f"{root.name}.yaml", tiny_config(root, **{**base, **sections}))
    result = runner.invoke(cli, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


SYSTEMS = {"steps_per_s": 2.0, "slow_clients": 2, "mode": "fedbuff", "fedbuff": {"buffer_size": 2}}
FEDERATION = {"rounds": 3, "clients_per_round": 4, "local_steps": 1}


def test_fedbuff_from_the_cli(tmp_path: Path, runner, one_torch_thread) -> None:
    records = _run(runner, tmp_path / "a", systems=SYSTEMS, federation=FEDERATION)
    steps = [r for r in records if r["split"] == "aggregate"]
    assert [r["round"] for r in steps] == [1, 2, 3] and all(r["num_updates"] == 2 for r in steps)
    times = [r["sim_seconds"] for r in steps]
    assert times == sorted(times) and times[0] > 0 and all("wall_seconds" in r for r in steps)
    trains = [r for r in records if r["split"] == "train"]
    assert all(r["staleness_weight"] == (1 + r["staleness"]) ** -0.5 for r in trains)
    assert any(r["staleness"] > 0 for r in trains)
    assert (tmp_path / "a" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_fedbuff_from_the_cli_twice_gives_the_same_adapter(tmp_path: Path, runner, one_torch_thread) -> None:
    runs = [_run(runner, tmp_path / name, systems=SYSTEMS, federation=FEDERATION) for name in ("a", "b")]
    times = [[r["sim_seconds"] for r in records if r["split"] == "aggregate"] for records in runs]
    assert times[0] == times[1] and len(times[0]) == 3
    first, second = (load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors")) for name in ("a", "b"))
    assert all((first[k] == second[k]).all() for k in first)


@pytest.mark.slow
def test_a_deadline_takes_the_slow_clients_partial_work(tmp_path: Path, runner, one_torch_thread) -> None:
    # slow clients take 0.4 steps/s: 1 of their 2 steps fits in 3 s; the fast ones need 1 s
    systems = {"steps_per_s": 2.0, "slow_clients": 4, "late_clients": "partial"}
    records = _run(runner, tmp_path / "d", systems=systems, federation={"rounds": 2, "local_steps": 2, "round_deadline_s": 3.0})
    trains = [r for r in records if r["split"] == "train"]
    assert {r["steps"] for r in trains} == {1.0, 2.0}
    assert all(r["client_sim_seconds"] <= 3.0 for r in trains)
    assert all("fednova_scale" in r for r in trains if r["steps"] == 1.0)
    steps = [r for r in records if r["split"] == "aggregate"]
    assert all(2.5 < r["sim_round_seconds"] <= 3.0 for r in steps)  # the slow clients' 1 step (2.5 s) and transfers
