"""Secure aggregation over Flower with real processes on 127.0.0.1: a SuperLink and 3 SuperNodes (each with fedlm's
long-lived ClientApp process, the node's SecAgg+ state in its context), against the simulation's secure run.

All are ``slow`` (minutes each on 2 cores: five messages per node and round); the default suite runs
the same checks over an in-memory Grid (``test_secagg_flower.py``). One secure deployment: bit for bit the
simulation's adapter, and the server's received replies hold no client's update (none equals or correlates with a
client's true delta, computed in the simulation). The others kill nodes (``FEDLM_SECAGG_FAULT``: the ClientApp kills its SuperNode at a stage) and make nodes send
malformed and replayed replies. Every process a test starts is stopped by PID (``LocalFederation.stop``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_config
from safetensors.torch import load_file
from test_secagg_flower import assert_no_plaintext, records, same, secure_config, true_deltas

import fedlm.loop_build.round_side as round_stages
from fedlm.cli import app as cli
from fedlm.runtime.flower.local import LocalFederation, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TIMEOUT = "90"  # seconds a stage waits for a node (a killed node is waited for once, then forgotten)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _simulate(root: Path, drop: dict | None, monkeypatch: pytest.MonkeyPatch) -> dict[tuple[int, str], np.ndarray]:
    """The simulation's secure run into ``root``; each client's true delta per round, flattened (sorted names)."""
    from typer.testing import CliRunner  # noqa: PLC0415

    build = round_stages.build_secure_aggregation

    def with_drop(*args: Any) -> Any:
        secure = build(*args)
        secure.drop = drop
        return secure

    with monkeypatch.context() as m:
        deltas = true_deltas(m)
        if drop is not None:
            m.setattr(round_stages, "build_secure_aggregation", with_drop)
        cfg = write_config(root.parent / f"{root.name}.yaml", secure_config(root, "simulation"))
        result = CliRunner().invoke(cli, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    return deltas


def _logs(fed: LocalFederation) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(fed.workdir.glob("*.log")))


def _deploy(tmp_path: Path, faults: dict[int, str] | None = None, restart_after_round_1: tuple[int, ...] = ()) -> Path:
    """3 SuperNodes run the secure config to its end (``faults``: partition id -> FEDLM_SECAGG_FAULT); the nodes of
    ``restart_after_round_1`` are started again (without their fault) once they died in round 1."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", secure_config(run_dir, "flower"))
    env = {pid: {"FEDLM_SECAGG_FAULT": fault} for pid, fault in (faults or {}).items()}
    fed = LocalFederation(tmp_path / "fed", cfg, [0, 1, 2], node_env=env)
    try:
        fed.start()
        run = fed.run("--round-timeout", TIMEOUT)
        if restart_after_round_1:  # once they died: the new nodes join while the server still waits for the dead
            dead = lambda: all(fed.nodes[pid].poll() is not None for pid in restart_after_round_1)  # noqa: E731
            wait_for(lambda: dead() or run.poll() is not None, 600, "the faulty nodes to die")
            fed.node_env = {}
            for pid in restart_after_round_1:
                fed.start_node(pid)
        code = run.wait(timeout=900)
        assert code == 0 and (run_dir / "adapter").is_dir(), _logs(fed)
    finally:
        fed.stop()
    return run_dir


def _aggregates(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in records(run_dir) if r["split"] == "aggregate"]


@pytest.mark.slow
def test_three_supernodes_sum_securely_to_the_simulation_adapter_and_the_server_sees_no_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deltas = _simulate(tmp_path / "sim", None, monkeypatch)
    dump = tmp_path / "received"
    monkeypatch.setenv("FEDLM_SECAGG_DUMP", str(dump))  # the ServerApp saves every reply it receives
    run_dir = _deploy(tmp_path)
    assert same(adapter(run_dir), adapter(tmp_path / "sim"))
    assert [a["aggregation"]["secagg_survivors"] for a in _aggregates(run_dir)] == [["0", "1", "2"]] * 2
    arrays = sorted(dump.glob("*.npy"))
    assert len(arrays) == 6 and all("masked_input" in p.name for p in arrays)  # one masked vector per client and round
    assert_no_plaintext([np.load(p) for p in arrays], [p.read_bytes() for p in dump.glob("*.bin")], deltas)
    trains = [r for r in records(run_dir) if r["split"] == "train"]
    assert all(r["upload_bytes"] > 0 and r["loss"] > 0 for r in trains)


@pytest.mark.slow
def test_a_supernode_killed_after_its_masked_input_is_recovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate(tmp_path / "sim", {1: {"unmask": {"1"}}, 2: {"advertise_keys": {"1"}}}, monkeypatch)
    run_dir = _deploy(tmp_path, {1: "1:unmask:die"})
    assert same(adapter(run_dir), adapter(tmp_path / "sim"))
    first, second = _aggregates(run_dir)
    assert first["aggregation"]["secagg_survivors"] == ["0", "1", "2"] and "1" in first["aggregation"]["secagg_excluded"]
    assert second["aggregation"]["secagg_survivors"] == ["0", "2"]


@pytest.mark.slow
def test_a_supernode_killed_before_its_masked_input_is_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate(tmp_path / "sim", {1: {"masked_input": {"2"}}, 2: {"advertise_keys": {"2"}}}, monkeypatch)
    run_dir = _deploy(tmp_path, {2: "1:masked_input:die"})
    assert same(adapter(run_dir), adapter(tmp_path / "sim"))
    first = _aggregates(run_dir)[0]
    assert first["aggregation"]["secagg_survivors"] == ["0", "1"] and first["aggregation"]["secagg_dropped_before_input"] == ["2"]


@pytest.mark.slow
def test_more_killed_supernodes_than_the_threshold_allows_abort_the_round_and_the_next_runs(tmp_path: Path) -> None:
    run_dir = _deploy(tmp_path, {1: "1:unmask:die", 2: "1:unmask:die"}, restart_after_round_1=(1, 2))
    first, second = _aggregates(run_dir)
    assert first["skipped"] and "fewer than the threshold 2" in first["aggregation"]["secagg_aborted"]
    assert not second["skipped"] and second["aggregation"]["secagg_survivors"] == ["0", "1", "2"]


@pytest.mark.slow
def test_malformed_and_replayed_protocol_messages_exclude_their_node_with_the_reason(tmp_path: Path) -> None:
    run_dir = _deploy(tmp_path, {1: "1:share_keys:malformed", 2: "2:advertise_keys:replay"})
    first, second = _aggregates(run_dir)
    assert first["aggregation"]["secagg_survivors"] == ["0", "2"] and second["aggregation"]["secagg_survivors"] == ["0", "1"]
    excluded = {(r["round"], r["client"]): r["reason"] for r in records(run_dir) if r["split"] == "secagg"}
    assert "malformed share_keys reply" in excluded[(1, "1")]
    assert "the reply is for round 1 stage advertise_keys" in excluded[(2, "2")] and "replayed" in excluded[(2, "2")]
    rejected = json.dumps([a["rejected"] for a in (first, second)])
    assert "excluded from secure aggregation" in rejected
