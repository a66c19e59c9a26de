"""Secure aggregation over Flower, in this process: the node's SecAgg+ handlers called with real Flower messages and
contexts, and whole runs over an in-memory Grid (:mod:`flower_grid`) against the simulation's secure run.

The real-process runs (SuperLink, SuperNodes, killed nodes) are in ``test_secagg_flower_processes.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config, write_config
from flower_grid import InMemoryGrid
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file

import fedlm.loop_build.round_side as round_stages
from fedlm.cli import app as cli
from fedlm.privacy.secagg import wire
from fedlm.privacy.secagg.server import SecAggServer
from fedlm.privacy.secagg.simulate import secure_sum
from fedlm.privacy.secagg.workflow import key_stages, masked_stage, unmask_stage
from fedlm.runtime.flower import client_app, secagg_node
from fedlm.runtime.flower import secagg_envelope as envelope

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LENGTH = 101


def secure_config(output_dir: Path, runtime: str, **privacy: Any) -> dict[str, Any]:
    """The tiny model, 3 clients (iid), all of them every round, 2 rounds, secure aggregation (threshold 2 of 3)."""
    return tiny_config(
        output_dir,
        partition={"method": "iid", "num_clients": 3, "field": None},
        federation={"runtime": runtime},
        eval={"every": 0, "generate": False, "max_examples": 8, "at_start": False},
        privacy={"secure_aggregation": {"max_weight": 64}, **privacy},
    )


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------ the node's handlers, one message at a time


def _message(round_num: int, stage: str, index: int, proto: RecordDict) -> Message:
    kind = f"{'train' if stage == 'masked_input' else 'query'}.{envelope.SECAGG_ACTION}"
    return Message(envelope.wrap(proto, round_num, stage, index, str(index - 1)), dst_node_id=index, message_type=kind)


def test_the_node_keeps_its_keys_in_its_context_and_refuses_messages_out_of_order() -> None:
    InMemoryGrid(ClientApp(), {}, {})  # sets Flower's task identity for messages made here
    context = Context(1, 1, {}, RecordDict(), {})
    setup = wire.message({"round": 3, "threshold": 2, "length": LENGTH, "neighbours": [2, 3]})
    reply = secagg_node.key_stage(_message(3, "advertise_keys", 1, setup), context)
    assert not reply.has_error() and envelope.head(reply.content) == (3, "advertise_keys", 1, "0")
    kept = context.state.config_records[secagg_node.STATE]
    assert kept["stage"] == "advertise_keys" and len(kept["sk_c"]) == 32
    sent = wire.to_bytes(reply.content)
    assert bytes(kept["sk_c"]) not in sent and bytes(kept["sk_s"]) not in sent and bytes(kept["seed_b"]) not in sent
    early = secagg_node.key_stage(_message(3, "unmask", 1, wire.message({"survivors": [1, 2], "dropped": []})), context)
    assert early.has_error() and "expected masked_input of this round first" in early.error.reason
    stale = secagg_node.key_stage(_message(2, "share_keys", 1, wire.message({"ids": [], "pk_c": [], "pk_s": [], "commit_b": []})), context)
    assert stale.has_error() and "share_keys of round 2" in stale.error.reason


def test_reply_checks_name_replayed_misrouted_and_malformed_replies() -> None:
    keys = wire.message({"pk_c": b"k" * 32, "pk_s": b"s" * 32, "commit_b": b"c" * 32})
    ok = envelope.wrap(keys, 4, "advertise_keys", 2, "1")
    assert envelope.reply_problem(ok, 4, "advertise_keys", 2, LENGTH) is None
    assert "a replayed or misrouted message" in envelope.reply_problem(
        envelope.wrap(keys, 3, "advertise_keys", 2, "1"), 4, "advertise_keys", 2, LENGTH
    )
    assert "client index 3" in envelope.reply_problem(envelope.wrap(keys, 4, "advertise_keys", 3, "1"), 4, "advertise_keys", 2, LENGTH)
    short = envelope.wrap(wire.message({"pk_c": b"k", "pk_s": b"s" * 32, "commit_b": b"c" * 32}), 4, "advertise_keys", 2, "1")
    assert "field pk_c must be 32 bytes" in envelope.reply_problem(short, 4, "advertise_keys", 2, LENGTH)
    masked = envelope.wrap(wire.message({}, np.zeros(LENGTH - 1, dtype=np.uint32)), 4, "masked_input", 2, "1")
    assert "expected (101,)" in envelope.reply_problem(masked, 4, "masked_input", 2, LENGTH)
    assert "no valid secure-aggregation header" in envelope.reply_problem(keys, 4, "advertise_keys", 2, LENGTH)


# ------------------------------------------------------------ the protocol over Flower messages vs in this process


def _codes(n: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(7)
    return {u: rng.integers(0, 2**20, LENGTH, dtype=np.uint32) for u in range(1, n + 1)}


def _codes_app(codes: dict[int, np.ndarray]) -> ClientApp:
    """The node's key handlers; its masked stage masks fixed codes instead of training."""
    app = ClientApp()
    app.query(envelope.SECAGG_ACTION)(secagg_node.key_stage)

    @app.train(envelope.SECAGG_ACTION)
    def masked(msg: Message, context: Context) -> Message:
        round_num, stage, index, client = envelope.head(msg.content)
        secagg = secagg_node._load(context, round_num, stage, index)
        reply = secagg.masked_input(envelope.protocol(msg.content), codes[index])
        secagg_node._save(context, secagg, stage)
        meta = RecordDict(
            {"meta": wire.message({"json": json.dumps({"client_id": client, "round": round_num, "num_examples": 1, "metrics": {}})})[wire.CONFIG]}
        )
        return Message(envelope.wrap(reply, round_num, stage, index, client, meta), reply_to=msg)

    return app


class _Runtime:
    """What FlowerChannel needs of a FlowerRuntime."""

    def __init__(self, grid: InMemoryGrid) -> None:
        from fedlm.config.io import validate_config  # noqa: PLC0415
        from fedlm.reporting.metrics_log import MetricsLog  # noqa: PLC0415

        self.grid, self.round_timeout_s, self.events = grid, 5.0, []
        self.config = validate_config(secure_config(Path("/tmp/unused"), "simulation"))
        self.log = type("Log", (), {"append": lambda _, r: self.events.append(r)})()
        self.forgotten: list[str] = []
        self.task_meta: dict[str, object] = {}  # what every train message carries besides the task (personalization)
        del MetricsLog

    def _forget(self, client: str, node: int) -> None:
        self.forgotten.append(client)


def _flower_sum(codes: dict[int, np.ndarray], faults: dict, threshold: int = 3) -> tuple[np.ndarray, SecAggServer, Any]:
    from fedlm.core.task import ClientContext, ClientTask, LocalPlan  # noqa: PLC0415
    from fedlm.runtime.flower.secagg_channel import FlowerChannel  # noqa: PLC0415

    n = len(codes)
    grid = InMemoryGrid(_codes_app(codes), {u: {} for u in codes}, {}, faults)
    runtime = _Runtime(grid)
    task = ClientTask(LocalPlan(1, [0.1], 4, 0), {}, ClientContext("x", 1))
    channel = FlowerChannel(runtime, 1, LENGTH, {str(u - 1): task for u in codes}, {u: u for u in codes}, {u: str(u - 1) for u in codes})
    server = SecAggServer(1, n, threshold, None, LENGTH, 5)
    total = unmask_stage(server, channel, masked_stage(server, channel, key_stages(server, channel)))
    return total, server, (channel, runtime)


def _plain(codes: dict[int, np.ndarray], who: list[int]) -> np.ndarray:
    return (np.sum([codes[u].astype(np.uint64) for u in who], axis=0) % 2**32).astype(np.uint32)


def test_flower_messages_and_the_in_process_channel_give_the_same_sum() -> None:
    codes = _codes(5)
    flower, server, (channel, _) = _flower_sum(codes, {})
    local = secure_sum(codes, round_num=1, threshold=3, neighbours=None, graph_seed=5)
    assert np.array_equal(flower, local.total) and np.array_equal(flower, _plain(codes, [1, 2, 3, 4, 5]))
    assert sorted(server.masked) == [1, 2, 3, 4, 5] and not channel.excluded
    assert min(channel.up.values()) > 4 * LENGTH  # the masked vector and the protocol's messages


def _malformed(round_num: int, stage: str, index: int, content: RecordDict) -> RecordDict | None:
    return envelope.wrap(wire.message({"dst": [1], "ciphertexts": []}), round_num, stage, index, "x") if stage == "share_keys" else content


def _replayed(round_num: int, stage: str, index: int, content: RecordDict) -> RecordDict | None:
    return envelope.wrap(envelope.protocol(content), round_num - 1, stage, index, "x") if stage == "advertise_keys" else content


def _dead_after_input(round_num: int, stage: str, index: int, content: RecordDict) -> RecordDict | None:
    return None if stage == "unmask" else content


def test_malformed_replayed_and_silent_nodes_are_excluded_and_the_protocol_recovers() -> None:
    codes = _codes(6)
    total, server, (channel, runtime) = _flower_sum(codes, {2: _malformed, 3: _replayed, 5: _dead_after_input})
    assert np.array_equal(total, _plain(codes, [1, 4, 5, 6]))  # 5 sent its masked input before it went silent
    assert sorted(server.masked) == [1, 4, 5, 6] and not server.dropped  # both left before sharing keys
    assert "malformed share_keys reply: fields dst and ciphertexts differ in length" in channel.excluded["1"]
    assert "the reply is for round 0 stage advertise_keys" in channel.excluded["2"]
    assert "did not reply to unmask" in channel.excluded["4"] and runtime.forgotten == ["4"]
    logged = {(e["client"], e["stage"]) for e in runtime.events if e["event"] == "excluded"}
    assert logged == {("1", "share_keys"), ("2", "advertise_keys"), ("4", "unmask")}


# ------------------------------------------------------------------------------ whole runs over the in-memory Grid


def true_deltas(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[int, str], np.ndarray]:
    """Every client's true delta per round, flattened in the encoded order, as the simulation encodes it."""
    from fedlm.privacy.secagg.round import SecureAggregation  # noqa: PLC0415

    deltas: dict[tuple[int, str], np.ndarray] = {}
    encode = SecureAggregation.encode

    def spy(self: SecureAggregation, update: Any, names: Any, dp: Any) -> Any:
        deltas[(update.round, update.client_id)] = np.concatenate([update.tensors[n].flatten().numpy() for n in names])
        return encode(self, update, names, dp)

    monkeypatch.setattr(SecureAggregation, "encode", spy)
    return deltas


def assert_no_plaintext(received: list[np.ndarray], blobs: list[bytes], deltas: dict[tuple[int, str], np.ndarray]) -> None:
    """No received array equals or correlates (|r| >= 0.5) with a true delta; no run of 16 of a delta's float32
    values (around its largest) appears in the received bytes."""
    assert deltas and received
    for array in received:
        values = array.astype(np.float64).ravel()
        for delta in deltas.values():
            if values.size in (delta.size, delta.size + 1):  # a masked vector: the delta's codes and the weight
                assert not np.array_equal(values[: delta.size], delta)
                assert abs(np.corrcoef(values[: delta.size], delta)[0, 1]) < 0.5
    for delta in deltas.values():
        window = delta[np.argmax(np.abs(delta)) // 16 * 16 :][:16].astype(np.float32).tobytes()
        assert not any(window in blob for blob in blobs)


def _simulate(root: Path, runner, drop: dict | None = None, monkeypatch=None, **privacy: Any) -> Path:
    if drop is not None:
        build = round_stages.build_secure_aggregation

        def with_drop(*args: Any):
            secure = build(*args)
            secure.drop = drop
            return secure

        monkeypatch.setattr(round_stages, "build_secure_aggregation", with_drop)
    cfg = write_config(root.parent / f"{root.name}.yaml", secure_config(root, "simulation", **privacy))
    result = runner.invoke(cli, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    return root


def _over_grid(root: Path, faults: dict | None = None, **privacy: Any) -> tuple[Path, InMemoryGrid]:
    from fedlm.runtime.flower import server_app  # noqa: PLC0415

    text = yaml.safe_dump(secure_config(root, "flower", **privacy))
    grid = InMemoryGrid(client_app.app, {n: {"partition-id": n - 1} for n in (1, 2, 3)}, {"fedlm-config": text}, faults or {})
    server_app.main(grid, Context(1, 0, {}, RecordDict(), {"fedlm-config": text, "round-timeout": 5.0, "wait-for-nodes": 1.0}))
    return root, grid


def test_a_secure_run_over_flower_messages_ends_with_the_simulation_adapter(tmp_path: Path, runner, monkeypatch) -> None:
    deltas = true_deltas(monkeypatch)
    sim = _simulate(tmp_path / "sim", runner)
    simulated = dict(deltas)
    deltas.clear()
    run, grid = _over_grid(tmp_path / "flower")
    assert same(adapter(run), adapter(sim))
    assert len(simulated) == 6 and all(np.array_equal(deltas[k], v) for k, v in simulated.items())  # nodes encoded the same
    received = [a.numpy() for _, c in grid.received for r in c.array_records.values() for a in r.values()]
    assert len(received) == 6  # one masked vector per client and round, and nothing else with tensors
    assert_no_plaintext(received, [wire.to_bytes(c) for _, c in grid.received], simulated)
    one = next(iter(simulated.values()))
    with pytest.raises(AssertionError):  # the check can fail: a plaintext update, or its codes, would be caught
        assert_no_plaintext([np.round((one + 0.5) * 2**20)], [], simulated)
    flower_rows, sim_rows = records(run), records(sim)
    aggs = [r for r in flower_rows if r["split"] == "aggregate"]
    assert [a["aggregation"]["secagg_survivors"] for a in aggs] == [["0", "1", "2"]] * 2
    assert all(r["upload_bytes"] > 0 for r in flower_rows if r["split"] == "train")
    sim_up = sum(r["upload_bytes"] for r in sim_rows if r["split"] == "train")
    flower_up = sum(r["upload_bytes"] for r in flower_rows if r["split"] == "train")
    assert sim_up < flower_up < 1.2 * sim_up  # the same protocol messages, plus headers and the metrics
    assert all(not c.array_records or set(c.array_records) == {wire.VECTOR} for _, c in grid.received)


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_client_dp_composes_over_flower_as_in_the_simulation(tmp_path: Path, runner, mode: str) -> None:
    """Central: the server noises the decoded sum; distributed: each node adds its noise share before masking."""
    dp = {"client_dp": {"noise_multiplier": 0.5, "clip": 0.05, "mode": mode}}
    sim = _simulate(tmp_path / "sim", runner, **dp)
    run, _ = _over_grid(tmp_path / "flower", **dp)
    assert same(adapter(run), adapter(sim))
    eps = lambda rows: [r["aggregation"]["epsilon"] for r in rows if r["split"] == "aggregate"]  # noqa: E731
    assert eps(records(run)) == eps(records(sim)) and all(e > 0 for e in eps(records(run)))
    plain = _simulate(tmp_path / "plain", runner)  # the noise is there: not the run without DP
    assert not same(adapter(run), adapter(plain))


def test_a_node_silent_after_its_masked_input_is_recovered_as_in_the_simulation(tmp_path: Path, runner, monkeypatch) -> None:
    # a node that went silent is forgotten (a restarted one would be greeted): round 2 runs without client 1
    sim = _simulate(tmp_path / "sim", runner, {1: {"unmask": {"1"}}, 2: {"advertise_keys": {"1"}}}, monkeypatch)
    run, _ = _over_grid(tmp_path / "flower", {2: lambda r, s, i, c: None if (r, s) == (1, "unmask") else c})
    assert same(adapter(run), adapter(sim))
    first = next(r for r in records(run) if r["split"] == "aggregate")
    assert first["aggregation"]["secagg_survivors"] == ["0", "1", "2"] and "1" in first["aggregation"]["secagg_excluded"]


def test_a_node_silent_before_its_masked_input_is_left_out_as_in_the_simulation(tmp_path: Path, runner, monkeypatch) -> None:
    sim = _simulate(tmp_path / "sim", runner, {1: {"masked_input": {"2"}}, 2: {"advertise_keys": {"2"}}}, monkeypatch)
    run, _ = _over_grid(tmp_path / "flower", {3: lambda r, s, i, c: None if (r, s) == (1, "masked_input") else c})
    assert same(adapter(run), adapter(sim))
    first = next(r for r in records(run) if r["split"] == "aggregate")
    assert first["aggregation"]["secagg_survivors"] == ["0", "1"] and first["aggregation"]["secagg_dropped_before_input"] == ["2"]


def test_more_excluded_nodes_than_the_threshold_allows_abort_the_round_and_the_next_runs(tmp_path: Path) -> None:
    def garbled(r: int, s: str, i: int, c: RecordDict) -> RecordDict:  # a malformed unmask reply in round 1 only
        return envelope.wrap(wire.message({"ids": [1], "kinds": [7], "shares": [b"x"]}), r, s, i, "x") if (r, s) == (1, "unmask") else c

    run, _ = _over_grid(tmp_path / "flower", {2: garbled, 3: garbled})
    rows = records(run)
    first, second = [r for r in rows if r["split"] == "aggregate"]
    assert first["skipped"] and "fewer than the threshold 2" in first["aggregation"]["secagg_aborted"]
    assert "field kinds must hold 0" in first["aggregation"]["secagg_excluded"]["1"]
    assert not second["skipped"] and second["aggregation"]["secagg_survivors"] == ["0", "1", "2"]
    assert [r["round"] for r in rows if r["split"] == "secagg" and r["event"] == "aborted"] == [1]
    start = adapter(run)
    assert all(torch.isfinite(t).all() for t in start.values())


def test_a_node_whose_update_is_not_finite_drops_out_before_masking_as_in_the_simulation(tmp_path: Path, runner, monkeypatch) -> None:
    from fedlm.federation.trainer import ClientTrainer  # noqa: PLC0415

    train = ClientTrainer.train

    def poisoned(self, client, *args, **kwargs):  # client "1" sends NaN in round 1, wherever it trains
        update = train(self, client, *args, **kwargs)
        if client == "1" and update.round == 1:
            update = type(update)(update.client_id, 1, update.num_examples, {k: v * float("nan") for k, v in update.tensors.items()}, update.metrics)
        return update

    monkeypatch.setattr(ClientTrainer, "train", poisoned)
    sim = _simulate(tmp_path / "sim", runner)
    run, grid = _over_grid(tmp_path / "flower")
    assert same(adapter(run), adapter(sim))
    first = next(r for r in records(run) if r["split"] == "aggregate")
    assert first["aggregation"]["secagg_survivors"] == ["0", "2"]
    assert "rejected on the node before masking: tensor" in first["aggregation"]["secagg_excluded"]["1"]
    assert "NaN or Inf" in json.dumps(first["rejected"])


def test_tampered_shares_over_flower_abort_the_round_as_in_the_simulation(tmp_path: Path) -> None:
    """Round 1: a share altered in transit fails authentication at its receiver (a node); round 2: a wrong unmasking
    share does not rebuild the committed seed (the server). Both rounds abort with the global model kept."""

    def flip(blobs: list[bytes]) -> list[bytes]:
        return [blobs[0][:-1] + bytes([blobs[0][-1] ^ 1]), *blobs[1:]]

    def tamper(r: int, s: str, i: int, c: RecordDict) -> RecordDict:
        f = dict(wire.fields(envelope.protocol(c)))
        if (r, s) == (1, "share_keys"):
            f["ciphertexts"] = flip(list(f["ciphertexts"]))
        elif (r, s) == (2, "unmask"):
            f["shares"] = flip(list(f["shares"]))
        else:
            return c
        return envelope.wrap(wire.message(f), r, s, i, envelope.head(c)[3])

    run, _ = _over_grid(tmp_path / "flower", {2: tamper})
    first, second = [r for r in records(run) if r["split"] == "aggregate"]
    assert first["skipped"] and "failed authentication (altered in transit)" in first["aggregation"]["secagg_aborted"]
    assert second["skipped"] and "tampered share" in second["aggregation"]["secagg_aborted"]
    excluded = [r for r in records(run) if r["split"] == "secagg" and r["event"] == "aborted"]
    assert [r["round"] for r in excluded] == [1, 2]  # skipped: AggregateOutcome keeps the global state
