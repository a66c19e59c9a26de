"""Per-client state on disk (:mod:`fedlm.core.client_state`): a client's state is read from disk only when asked,
written as a version of the round, rolled back on resume and pruned to the kept checkpoints; SCAFFOLD's c_i and the
error-feedback residuals live there in a simulated run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_config
from safetensors.torch import load_file

from fedlm.aggregation.base import build_aggregator
from fedlm.cli import app
from fedlm.compression.state import WithCompressionState
from fedlm.core.client_state import ClientStates, DiskVersions
from fedlm.core.update import ClientUpdate
from fedlm.federation.checkpoint import list_checkpoints, load_checkpoint
from fedlm.federation.observers.client_state import client_states_of, spill_client_states


def _t(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value)}


def test_in_memory_until_spilled_then_versions_on_disk(tmp_path: Path) -> None:
    states = ClientStates()
    states["a"] = _t(1.0)  # e.g. loaded from an in-memory checkpoint of round 2
    disk = DiskVersions(tmp_path / "clients", "residuals")
    states.spill(disk, start_round=2)
    assert states.checkpoint_state() == {} and disk.rounds("a") == [2]  # memory emptied, written as of round 2
    assert torch.equal(states["a"]["w"], torch.full((3,), 1.0))
    states["b"] = _t(2.0)  # round 3
    states.round = 4
    states["a"] = _t(4.0)
    assert sorted(states) == ["a", "b"] and len(states) == 2 and states.get("nobody") is None
    assert disk.rounds("a") == [2, 4] and torch.equal(states["a"]["w"], torch.full((3,), 4.0))
    assert (tmp_path / "clients" / "a" / "residuals" / "round_0004.safetensors").is_file()
    # resumed after round 3: the round-4 version is dropped and the client reads what it had after round 3
    again = ClientStates()
    again.spill(disk, start_round=3)
    assert disk.rounds("a") == [2] and torch.equal(again["a"]["w"], torch.full((3,), 1.0)) and again.round == 4
    with pytest.raises(TypeError, match="versioned"):
        del again["a"]


def test_prune_keeps_what_each_kept_checkpoint_needs(tmp_path: Path) -> None:
    disk = DiskVersions(tmp_path, "c_clients")
    for r in (1, 3, 5, 6, 8):
        disk.save("a", r, _t(float(r)))
    disk.prune([4, 6])
    assert disk.rounds("a") == [3, 6, 8]  # newest <= 4, newest <= 6, everything after 6
    disk.prune([])
    assert disk.rounds("a") == [3, 6, 8]


def test_scaffold_and_residual_states_are_found_through_wrappers_and_spilled(tmp_path: Path) -> None:
    scaffold = build_aggregator("scaffold", {})
    wrapped = WithCompressionState(scaffold)
    found = client_states_of(wrapped)
    assert [name for name, _ in found] == ["residuals", "c_clients"]
    spill = spill_client_states(wrapped, tmp_path / "clients", tmp_path / "checkpoints")
    assert spill is not None and spill_client_states(build_aggregator("fedavg", {}), tmp_path, tmp_path) is None
    spill.on_start({}, 0)
    scaffold.start(["a", "b"])
    x = {"w": torch.zeros(3)}
    update = ClientUpdate("a", 1, 4, {"w": torch.ones(3)}, {"loss": 1.0}, {"delta_c.w": torch.ones(3)}, {"c_i.w": torch.full((3,), 7.0)})
    scaffold.aggregate(x, [update])
    assert scaffold.state_dict()["c_clients"] == {}  # the checkpoint holds no client state: the disk versions are it
    assert (tmp_path / "clients" / "a" / "c_clients" / "round_0001.safetensors").is_file()
    context = scaffold.client_context("a", 2)  # read back from disk for the client's next round
    assert torch.equal(context.memory["c_i.w"], torch.full((3,), 7.0)) and scaffold.client_context("b", 2).memory == {}


@pytest.mark.slow
def test_a_thousand_clients_keep_their_state_on_disk_and_resume_exactly(tmp_path: Path, runner) -> None:
    """1,000 clients, 10 per round, SCAFFOLD with top-k error feedback on the tiny model: only the trained clients
    have state folders, the checkpoint holds none of it, and a resumed run ends with the uninterrupted adapter."""

    def run(name: str, rounds: int, *extra: str) -> Path:
        config = tiny_config(
            tmp_path / name,
            data={"max_train_examples": 4000, "max_length": 64},  # every client needs an example within max_length
            partition={"method": "iid", "num_clients": 1000},
            federation={"rounds": rounds, "clients_per_round": 10, "local_steps": 1, "batch_size": 2},
            aggregation={"name": "scaffold"},
            compression={"uplink": {"method": "topk", "ratio": 0.1}},
            eval={"every": 0, "at_start": False, "generate": False, "max_examples": 4},
        )
        result = runner.invoke(app, ["run", str(write_config(tmp_path / f"{name}.yaml", config)), *extra])
        assert result.exit_code == 0, result.output
        return tmp_path / name

    straight = run("straight", 3)
    trained = {json.loads(line)["client"] for line in (straight / "metrics.jsonl").read_text().splitlines() if '"split": "train"' in line}
    folders = {p.name for p in (straight / "clients").iterdir()}
    assert folders == trained and 10 < len(trained) <= 30
    assert all((straight / "clients" / c / "c_clients").is_dir() and (straight / "clients" / c / "residuals").is_dir() for c in trained)
    state = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1]).aggregator_state
    assert state["residuals"] == {} and state["inner"]["c_clients"] == {}
    run("split", 2)
    resumed = run("split", 2, "--resume", "--set", "federation.rounds=3")
    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
