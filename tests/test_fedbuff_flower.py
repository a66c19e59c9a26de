"""FedBuff over Flower (``systems.mode: fedbuff`` with ``federation.runtime: flower``): the server sends one client's
task at a time and steps on replies in the order they arrive. With one client in flight (and with equal devices)
the arrivals come in the simulation's order, so the run ends with the simulation's FedBuff adapter bit for bit; a
slow node's update arrives stale and is weighted by the paper's 1/sqrt(1 + staleness)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, write_config
from flower_grid import InMemoryGrid
from flower_runs import run_on_grid, run_on_supernodes, write_flower_config
from safetensors.torch import load_file

from fedlm.cli import app as cli

EVAL = {"every": 0, "generate": False, "max_examples": 8, "at_start": False}
PARTITION = {"method": "iid", "num_clients": 3, "field": None}


def _sections(concurrency: int, buffer_size: int, rounds: int = 4) -> dict[str, Any]:
    return {
        "partition": PARTITION,
        "federation": {"rounds": rounds, "clients_per_round": concurrency, "min_clients": 1},
        "systems": {"mode": "fedbuff", "fedbuff": {"buffer_size": buffer_size, "concurrency": concurrency}},
    }


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _flower(root: Path, sections: dict[str, Any], latency: dict[int, int] | None = None) -> InMemoryGrid:
    return run_on_grid(root, {**sections, "eval": EVAL}, latency=latency or {})


@pytest.mark.parametrize(("concurrency", "buffer_size"), [(1, 1), (2, 2)])
def test_fedbuff_over_flower_messages_ends_with_the_simulations_fedbuff_adapter(
    tmp_path: Path, runner, one_torch_thread, concurrency: int, buffer_size: int
) -> None:
    sections = _sections(concurrency, buffer_size)
    cfg = write_config(tmp_path / "sim.yaml", tiny_config(tmp_path / "sim", eval=EVAL, **sections))
    result = runner.invoke(cli, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    _flower(tmp_path / "flower", sections)
    a, b = _adapter(tmp_path / "sim"), _adapter(tmp_path / "flower")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r for r in _records(tmp_path / "flower") if r["split"] == "aggregate"]
    assert len(steps) == 4 and all("wall_seconds" in r and "sim_seconds" not in r for r in steps)
    trains = [r for r in _records(tmp_path / "flower") if r["split"] == "train"]
    assert all(r["client_wall_seconds"] > 0 for r in trains)


def test_a_slow_nodes_update_arrives_stale_and_is_weighted_by_one_over_sqrt_one_plus_staleness(tmp_path: Path, one_torch_thread) -> None:
    _flower(tmp_path / "flower", _sections(3, 1, rounds=6), latency={3: 2})  # node 3 (client 2) answers 2 polls late
    rows = _records(tmp_path / "flower")
    steps = [r for r in rows if r["split"] == "aggregate"]
    assert [r["round"] for r in steps] == [1, 2, 3, 4, 5, 6] and all(len(r["clients"]) == 1 for r in steps)
    assert steps[0]["clients"] != ["2"]  # the slow client is not first
    late = [r for r in rows if r["split"] == "train" and r["client"] == "2"]
    assert late and late[0]["staleness"] >= 1
    for r in (r for r in rows if r["split"] == "train"):
        assert math.isclose(r["staleness_weight"], (1 + r["staleness"]) ** -0.5)
    assert (tmp_path / "flower" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_fedbuff_on_real_supernodes_steps_on_replies_as_they_arrive(tmp_path: Path) -> None:
    """A SuperLink and three SuperNodes: three clients in flight, a server step every two replies."""
    run_dir = tmp_path / "run"
    run_on_supernodes(tmp_path / "fed", write_flower_config(tmp_path / "c.yaml", run_dir, {**_sections(3, 2), "eval": EVAL}), run_dir)
    rows = _records(run_dir)
    steps = [r for r in rows if r["split"] == "aggregate"]
    assert [r["round"] for r in steps] == [1, 2, 3, 4] and all(r["num_updates"] == 2 for r in steps)
    assert sum(len(r["clients"]) for r in steps) == 8 and all(r["in_flight"] >= 1 for r in steps)
    assert any(s > 0 for r in steps for s in r["aggregation"]["staleness"].values())  # a third client is always in flight
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
