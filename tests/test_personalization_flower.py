"""Personalization over Flower: each client's personal state lives on its SuperNode (``--state-dir``), never on the server.

The ServerApp runs with its real ``FlowerRuntime`` over Flower messages to the real ClientApp (in this process,
:class:`flower_grid.InMemoryGrid`: Flower's serialisation, one ``Context`` per node) and must end as the in-process
simulation does, bit for bit: the global adapter, every client's personal adapter and ``personal.json`` (written on
its node), and the ``personal`` records of ``metrics.jsonl`` (evaluated on the nodes). A resumed server (a new Flower
run, the nodes' state directories kept) replays exactly. The server's run dir holds no personal state; a node without
a state directory is refused with a message naming the option. The slow test does the same with real SuperLink and
SuperNode processes on 127.0.0.1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_config, write_config
from flower_grid import InMemoryGrid
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from fedlm.cli import app
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.runtime.flower import client_app, messages, node_cache, server_app
from fedlm.runtime.flower.runtime import FlowerRuntime
from fedlm.runtime.flower.state_dir import STATE_DIR_KEY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SECTIONS: dict[str, Any] = {
    "partition": {"method": "iid", "num_clients": 3, "field": None},
    "federation": {"rounds": 2, "clients_per_round": 2, "local_steps": 2, "batch_size": 4, "lr": 0.003},
    "eval": {"every": 0, "max_examples": 9, "generate": False, "batch_size": 9, "at_start": False},
    "data": {"max_train_examples": 60, "max_length": 64},
}


def _config(out: Path, method: str, runtime: str, rounds: int = 2) -> dict[str, Any]:
    fed = {**SECTIONS["federation"], "runtime": runtime, "rounds": rounds}
    return tiny_config(out, **{**SECTIONS, "federation": fed}, personalization={"method": method})


def _simulate(runner, tmp_path: Path, method: str, rounds: int = 2) -> Path:
    run = tmp_path / "sim"
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "sim.yaml", _config(run, method, "simulation", rounds)))])
    assert result.exit_code == 0, result.output
    return run


def _nodes(tmp_path: Path, state: bool = True) -> dict[int, dict[str, Any]]:
    return {n: {"partition-id": n - 1, **({STATE_DIR_KEY: str(tmp_path / f"node{n}")} if state else {})} for n in (1, 2, 3)}


def _serve(text: str, nodes: dict[int, dict[str, Any]], resume: bool = False) -> InMemoryGrid:
    """One Flower run of the ServerApp over the ClientApp (a fresh grid: new per-node contexts, as a new Flower run)."""
    grid = InMemoryGrid(client_app.app, nodes, {"fedlm-config": text})
    run_config = {"fedlm-config": text, "round-timeout": 60.0, "wait-for-nodes": 1.0, "resume": resume}
    try:
        server_app.main(grid, Context(1, 0, {}, RecordDict(), run_config))
    finally:
        node_cache.clear()
    return grid


def _personal_dir(node_state: Path, client: str) -> Path:
    (folder,) = node_state.glob(f"*/clients/{client}")  # DIR/<config hash>/clients/<name>/
    return folder


def _records(run: Path, split: str) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_as_simulated(sim: Path, run: Path, tmp_path: Path) -> None:
    assert _same(_adapter(sim / "adapter"), _adapter(run / "adapter"))
    assert not (run / "clients").exists()  # the server keeps no personal state
    for n, client in ((1, "0"), (2, "1"), (3, "2")):
        on_node = _personal_dir(tmp_path / f"node{n}", client)
        assert _same(_adapter(sim / "clients" / client / "adapter"), _adapter(on_node / "adapter")), client
        assert json.loads((sim / "clients" / client / "personal.json").read_text()) == json.loads((on_node / "personal.json").read_text())
        assert (on_node / "profile.safetensors").is_file()
    personal = _records(run, "personal")
    assert personal == _records(sim, "personal") and {r["client"] for r in personal} == {"0", "1", "2"}
    assert "Personalization" in (run / "report.md").read_text()


@pytest.mark.parametrize("method", ["finetune", "fedsa"])
def test_personal_methods_over_flower_messages_end_as_the_simulation(runner, tmp_path: Path, method: str) -> None:
    sim = _simulate(runner, tmp_path, method)
    text = yaml.safe_dump(_config(tmp_path / "flower", method, "flower"))
    grid = _serve(text, _nodes(tmp_path))
    _assert_as_simulated(sim, tmp_path / "flower", tmp_path)
    if method == "fedsa":  # only A travels: every B of every upload is zero
        uploads = [messages.unpack_tensors(c.array_records["tensors"]) for _, c in grid.received if "tensors" in c.array_records]
        assert len(uploads) == 4
        assert all(not t.any() for u in uploads for n, t in u.items() if ".lora_B." in n)
        assert any(t.any() for u in uploads for n, t in u.items() if ".lora_A." in n)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ditto", "dual", "prompt"])
def test_the_other_personal_methods_over_flower_messages_end_as_the_simulation(runner, tmp_path: Path, method: str) -> None:
    sim = _simulate(runner, tmp_path, method)
    _serve(yaml.safe_dump(_config(tmp_path / "flower", method, "flower")), _nodes(tmp_path))
    _assert_as_simulated(sim, tmp_path / "flower", tmp_path)


def _versions(tmp_path: Path) -> list[str]:
    """The personal state versions on every node (``round_NNNN.safetensors`` names)."""
    return [p.name for n in (1, 2, 3) for d in (tmp_path / f"node{n}").glob("*/clients/*/state") for p in d.iterdir()]


@pytest.mark.slow
def test_a_fresh_run_drops_stale_node_state_and_a_resumed_server_replays_the_simulation(runner, tmp_path: Path, monkeypatch) -> None:
    """Ditto, the nodes' state directories kept throughout: an older run of 3 rounds dies after round 3 trained; a
    fresh run of 2 rounds drops its versions at its first message (else its personal adapters would be the old
    round 3's); it dies after round 2 trained (its round-2 versions written, the round-2 checkpoint not); the server
    resumed (a new Flower run) from round 1 has the nodes drop round 2 and replay it, and ends as the simulation."""
    sim = _simulate(runner, tmp_path, "ditto", rounds=2)
    original = FlowerRuntime.train_clients

    def crash_after(round_num: int):  # type: ignore[no-untyped-def]
        def train_clients(self, tasks):  # type: ignore[no-untyped-def]
            out = original(self, tasks)
            if next(iter(tasks.values())).plan.round == round_num:
                raise KeyboardInterrupt
            return out

        return train_clients

    monkeypatch.setattr(FlowerRuntime, "train_clients", crash_after(3))
    with pytest.raises(KeyboardInterrupt):
        _serve(yaml.safe_dump(_config(tmp_path / "old", "ditto", "flower", rounds=3)), _nodes(tmp_path))
    assert "round_0003.safetensors" in _versions(tmp_path)
    text = yaml.safe_dump(_config(tmp_path / "flower", "ditto", "flower", rounds=2))
    monkeypatch.setattr(FlowerRuntime, "train_clients", crash_after(2))
    with pytest.raises(KeyboardInterrupt):
        _serve(text, _nodes(tmp_path))
    assert "round_0003.safetensors" not in _versions(tmp_path) and "round_0002.safetensors" in _versions(tmp_path)
    monkeypatch.setattr(FlowerRuntime, "train_clients", original)
    _serve(text, _nodes(tmp_path), resume=True)
    _assert_as_simulated(sim, tmp_path / "flower", tmp_path)


def test_a_node_without_a_state_dir_is_refused_naming_the_option(tmp_path: Path) -> None:
    config = _config(tmp_path / "run", "ditto", "flower")
    hello = messages.meta(messages.hello_content(validate_config(config)))
    run_config = {"fedlm-config": yaml.safe_dump(config)}
    with pytest.raises(FedlmError, match=r"`personalization.method: ditto` keeps each client's personal state on its node, .*--state-dir DIR"):
        client_app.check_node(hello, {"partition-id": 0}, run_config)
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(FedlmError, match="is not a writable directory"):
        client_app.check_node(hello, {"partition-id": 0, STATE_DIR_KEY: str(blocked / "state")}, run_config)
    assert client_app.check_node(hello, {"partition-id": 1, STATE_DIR_KEY: str(tmp_path / "ok")}, run_config) == ("1", 1)


def test_supernode_refuses_a_state_dir_it_cannot_write(tmp_path: Path, runner) -> None:
    cfg = write_config(tmp_path / "c.yaml", _config(tmp_path / "run", "finetune", "flower"))
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["flower", "supernode", str(cfg), "--partition-id", "0", "--state-dir", str(tmp_path / "file" / "x")])
    assert result.exit_code == 2
    assert "--state-dir" in result.output and "is not a writable directory" in result.output


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"federation": {"runtime": "flower-simulation"}}, r"`federation.runtime: flower-simulation` runs clients in Ray workers"),
        (
            {
                "partition": {"method": "node_local", "clients": ["a", "b", "c"]},
                "data": {"test": "embedded:wordnet_defs/test"},
                "federation": {"runtime": "flower"},
            },
            r"node_local` is not built",
        ),
    ],
)
def test_what_is_not_built_over_flower_is_refused_at_load(tmp_path: Path, sections: dict[str, Any], message: str) -> None:
    config = tiny_config(tmp_path / "run", personalization={"method": "finetune"}, **sections)
    with pytest.raises(FedlmError, match=message):
        validate_config(config)
    assert validate_config(_config(tmp_path / "run", "finetune", "flower")).federation.runtime == "flower"


@pytest.mark.slow
def test_real_supernodes_keep_the_personal_state_and_end_as_the_simulation(runner, tmp_path: Path) -> None:
    """A SuperLink and 3 SuperNodes (``fedlm flower supernode --state-dir``) as processes on 127.0.0.1, FedSA-LoRA."""
    from fedlm.runtime.flower.local import LocalFederation  # noqa: PLC0415

    sim = _simulate(runner, tmp_path, "fedsa")
    run = tmp_path / "flower"
    cfg = write_config(tmp_path / "flower.yaml", _config(run, "fedsa", "flower"))
    fed = LocalFederation(tmp_path / "fed", cfg, [0, 1, 2], state_dirs={k: tmp_path / f"node{k + 1}" for k in range(3)})
    try:
        fed.start()
        code = fed.run("--round-timeout", "300").wait(timeout=900)
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(fed.workdir.glob("*.log")))
        assert code == 0, logs
    finally:
        fed.stop()
    _assert_as_simulated(sim, run, tmp_path)
    assert {r["client"] for r in _records(run, "flower") if r.get("event") == "personal"} == {"0", "1", "2"}


def test_personalization_with_secure_aggregation_over_flower_ends_as_the_simulation(runner, tmp_path: Path) -> None:
    """SecAgg+ and personal state together: the server sees only the masked sum of the shared updates, the personal
    adapters stay on their nodes, and both end as the simulation's secure run, bit for bit."""
    secure = {"secure_aggregation": {"max_weight": 64}}
    fed = {**SECTIONS["federation"], "clients_per_round": 3}

    def config(out: Path, runtime: str) -> dict[str, Any]:
        return tiny_config(out, **{**SECTIONS, "federation": {**fed, "runtime": runtime}}, personalization={"method": "finetune"}, privacy=secure)

    sim = tmp_path / "sim"
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "sim.yaml", config(sim, "simulation")))])
    assert result.exit_code == 0, result.output
    grid = _serve(yaml.safe_dump(config(tmp_path / "flower", "flower")), _nodes(tmp_path))
    _assert_as_simulated(sim, tmp_path / "flower", tmp_path)
    rounds = _records(tmp_path / "flower", "aggregate")
    assert [r["aggregation"]["secagg_survivors"] for r in rounds] == [["0", "1", "2"]] * 2
    assert not any("tensors" in c.array_records for _, c in grid.received)  # no plain update reached the server
