"""Broadcast downlinks over Flower (``compression.downlink``, FedKSeed's seed lists): each node keeps its own replica
of the global model and rebuilds the server's from the messages it missed; the run ends with the simulation's
adapter bit for bit, what travels is what is counted, and a node that lost its replica gets the dense model."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, write_config
from flower_grid import InMemoryGrid
from flower_runs import run_on_grid, run_on_supernodes, write_flower_config
from flwr.app import Message, RecordDict
from safetensors.torch import load_file

from fedlm.cli import app as cli
from fedlm.compression.catch_up import UNKNOWN, state_digest, sync_tasks
from fedlm.compression.downlink import DownlinkState
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.core.task import ClientContext, ClientTask, LocalPlan
from fedlm.federation.wire import serialized_bytes
from fedlm.runtime.flower.messages import REPLICA_MESSAGE, meta

EVAL = {"every": 0, "generate": False, "max_examples": 8, "at_start": False}
QUANTIZED = {
    "partition": {"method": "iid", "num_clients": 3, "field": None},
    "federation": {"rounds": 4, "clients_per_round": 2},
    "compression": {"downlink": {"method": "quantize", "bits": 4}},
}
FEDKSEED = {
    "partition": {"method": "iid", "num_clients": 3, "field": None},
    "federation": {"rounds": 4, "clients_per_round": 2, "local_steps": 4, "lr": 0.01, "algorithm": "fedkseed", "fedkseed": {"seeds": 64}},
}


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _simulation(runner, root: Path, sections: dict[str, Any]) -> Path:
    cfg = write_config(root.parent / f"{root.name}.yaml", tiny_config(root, eval=EVAL, **sections))
    result = runner.invoke(cli, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    return root


def _flower(root: Path, sections: dict[str, Any], grid_type: type[InMemoryGrid] = InMemoryGrid) -> InMemoryGrid:
    return run_on_grid(root, {**sections, "eval": EVAL}, grid_type)


def _blob_bytes(content: RecordDict, group: str) -> int:
    return len(content.array_records[group]["safetensors"].numpy().tobytes())


def _train_messages(grid: InMemoryGrid) -> list[tuple[int, dict[str, Any], RecordDict]]:
    return [(node, meta(c), c) for node, c in grid.sent if "state" in c.array_records]


def _travelled(content: RecordDict) -> int:
    """The downlink bytes of a train message: the catch-up messages, or the dense state (and the extras)."""
    groups = [g for g in content.array_records if g.startswith(REPLICA_MESSAGE)] or ["state"]
    return sum(_blob_bytes(content, g) for g in [*groups, "extras"])


@pytest.mark.parametrize("sections", [QUANTIZED, FEDKSEED], ids=["quantized-downlink", "fedkseed-seed-lists"])
def test_nodes_rebuild_the_broadcast_replica_and_end_with_the_simulation_adapter(tmp_path: Path, runner, one_torch_thread, sections) -> None:
    sim = _simulation(runner, tmp_path / "sim", sections)
    grid = _flower(tmp_path / "flower", sections)
    a, b = _adapter(sim), _adapter(tmp_path / "flower")
    assert all(torch.equal(a[k], b[k]) for k in a)
    messages = _train_messages(grid)
    assert len(messages) == 2 * sections["federation"]["rounds"]
    caught_up = [m for _, m, _ in messages if m["replica"]["since"] is not None]
    assert caught_up and any(len(m["replica"]["rounds"]) >= 2 for m in caught_up)  # some client missed a round
    for _, m, content in messages:  # a catch-up carries no state; every other train message the dense state
        assert (_blob_bytes(content, "state") == 0) == (m["replica"]["since"] is not None)
    logged = {(r["round"], r["client"]): r["download_bytes"] for r in _records(tmp_path / "flower") if r["split"] == "train"}
    assert logged == {(m["round"], m["client_id"]): _travelled(c) for _, m, c in messages}  # what travelled is what is counted
    assert logged == {(r["round"], r["client"]): r["download_bytes"] for r in _records(sim) if r["split"] == "train"}
    if sections is FEDKSEED:
        uploads = [r["upload_bytes"] for r in _records(tmp_path / "flower") if r["split"] == "train"]
        assert all(size < 10_000 for size in uploads)


class _NodeOneRestarts(InMemoryGrid):
    """Node 1 loses its Flower state (a restarted SuperNode) before its round-3 message."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            if msg.metadata.dst_node_id == 1 and "state" in msg.content.array_records and meta(msg.content)["round"] == 3:
                self.contexts[1].state = RecordDict()
        return super().send_and_receive(messages, timeout=timeout)


def test_a_node_that_lost_its_replica_refuses_the_catch_up_and_then_gets_the_dense_model(tmp_path: Path, one_torch_thread) -> None:
    sections = {**QUANTIZED, "federation": {"rounds": 4, "clients_per_round": 3, "min_clients": 1}}
    grid = _flower(tmp_path / "flower", sections, _NodeOneRestarts)
    to_one = {m["round"]: m["replica"]["since"] for node, m, _ in _train_messages(grid) if node == 1}
    assert to_one == {1: 0, 2: 1, 3: 2, 4: None}  # catch-ups from the initial adapter on; round 4 dense
    rows = _records(tmp_path / "flower")
    failures = [f["reason"] for r in rows if r["split"] == "aggregate" and r["round"] == 3 for f in r["rejected"]]
    assert any("holds no replica" in f for f in failures), failures
    assert [r["round"] for r in rows if r["split"] == "train" and r["client"] == "0"] == [1, 2, 4]
    assert (tmp_path / "flower" / "adapter" / "adapter_model.safetensors").is_file()


def test_catch_up_sends_the_missed_messages_only_while_they_are_smaller_and_kept() -> None:
    state = {"w": torch.ones(64)}
    dense = serialized_bytes(state)
    m = dense // 3 + 1  # each message's size: two are smaller than the dense model, three are not
    down = DownlinkState(dict(state), {1: m, 2: m, 3: m}, {"a": 0, "b": 2, "c": UNKNOWN}, keep_messages=True)
    down.messages = {r: {"m": torch.zeros(10)} for r in (1, 2, 3)}
    tasks = {c: ClientTask(LocalPlan(3, [0.1], 1, 0), state, ClientContext(c, 3)) for c in "abc"}
    sent: dict[tuple[int, str], int] = {}
    synced = sync_tasks(tasks, down, "codec", 3, sent)
    assert sent[(3, "a")] == dense and synced["a"].replica.since is None  # three messages are not smaller
    assert sent[(3, "b")] == m and synced["b"].replica.since == 2 and list(synced["b"].replica.messages) == [3]
    assert sent[(3, "c")] == dense and synced["c"].replica.since is None  # unknown replica: dense
    assert all(t.replica.digest == state_digest(state) and t.replica.through == 3 for t in synced.values())
    assert down.synced == {"a": 3, "b": 3, "c": 3} and list(down.messages) == [2, 3]  # three outweigh the dense model
    down.message_bytes[4], down.messages[4] = m, {"m": torch.zeros(10)}
    down.synced.update(a=2, b=1)  # b needs round 2-4: three messages, and round 2 is no longer kept
    synced = sync_tasks({c: tasks[c] for c in "ab"}, down, "codec", 4, sent)
    assert synced["a"].replica.since == 2 and list(synced["a"].replica.messages) == [3, 4]
    assert synced["b"].replica.since is None and list(down.messages) == [3, 4]
    del down.messages[3]
    down.synced.update(a=3, b=2)  # b needs round 3, which is no longer kept: dense
    synced = sync_tasks({c: tasks[c] for c in "ab"}, down, "codec", 4, sent)
    assert synced["a"].replica.since == 3 and synced["b"].replica.since is None


def test_a_downlink_with_client_ranks_over_flower_is_refused_at_load(tmp_path: Path) -> None:
    sections = {**QUANTIZED, "federation": {**QUANTIZED["federation"], "runtime": "flower"}, "peft": {"client_ranks": [2, 4, 4]}}
    with pytest.raises(FedlmError) as info:
        validate_config(tiny_config(tmp_path, **sections))
    assert "each node keeps the full replica" in str(info.value)


@pytest.mark.slow
def test_fedkseed_seed_lists_on_real_supernodes_end_with_the_simulation_adapter(tmp_path: Path, runner) -> None:
    """A SuperLink and three SuperNodes (fedlm's long-lived ClientApp): the replica survives between messages in
    Flower's per-node state, and the nodes replay the seed lists to the server's model bit for bit."""
    sections = {**FEDKSEED, "federation": {**FEDKSEED["federation"], "rounds": 3}}
    sim = _simulation(runner, tmp_path / "sim", sections)
    run_dir = tmp_path / "flower"
    run_on_supernodes(tmp_path / "fed", write_flower_config(tmp_path / "flower.yaml", run_dir, {**sections, "eval": EVAL}), run_dir)
    a, b = _adapter(sim), _adapter(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [r for r in _records(run_dir) if r["split"] == "train"]
    assert rows and all(r["upload_bytes"] + r["download_bytes"] < 10_000 for r in rows)
    assert not [f for r in _records(run_dir) if r["split"] == "aggregate" for f in r["rejected"]]
