"""``partition.method: node_local``: each SuperNode trains on its own data file; the server reads none of it.

Fast tests: the config refusals, the config hash ignoring the nodes' own data paths, the server's session with no
client data (its ``data.train`` does not even exist), a node's session holding exactly the examples the simulation's
``by_field`` partition gives that client, and node start-up checks. The ``slow`` test runs a SuperLink and 3 SuperNodes,
each with its own file, and ends with the adapter of the simulation of the same records in one file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, write_config
from safetensors.torch import load_file

from fedlm.cli import app
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.data.readers import read_records
from fedlm.experiment import build_session
from fedlm.reporting.progress import RunConsole
from fedlm.runtime.flower import messages

CLIENTS = ["noun.animal", "noun.food", "verb.motion"]
PER_CLIENT = 24


def client_files(folder: Path) -> dict[str, Path]:
    """Each client's records (its first PER_CLIENT WordNet definitions of its domain) in its own JSONL file, and all of
    them in one file (``all``) in client order, for the simulation."""
    folder.mkdir(parents=True, exist_ok=True)
    records = read_records("embedded:wordnet_defs", "data.train")
    files, everything = {}, []
    for name in CLIENTS:
        mine = [r for r in records if r["domain"] == name][:PER_CLIENT]
        everything += mine
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in mine))
    files["all"] = folder / "all.jsonl"
    files["all"].write_text("".join(json.dumps(r) + "\n" for r in everything))
    return files


def node_local_config(output_dir: Path, train: str, **sections: dict[str, Any]) -> dict[str, Any]:
    config = tiny_config(
        output_dir,
        data={"train": train, "test": "embedded:wordnet_defs/test", "max_train_examples": None, "max_length": 128},
        partition={"method": "node_local", "clients": CLIENTS, "field": None},
        federation={"runtime": "flower"},
    )
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"partition": {"method": "node_local", "clients": None}}, "`partition.clients` is required"),
        ({"partition": {"method": "node_local", "clients": ["a", "b", "a"]}}, "`partition.clients` names a more than once"),
        ({"partition": {"method": "by_field", "clients": ["a"]}}, "`partition.clients` is only for `partition.method: node_local`"),
        ({"federation": {"runtime": "simulation"}}, "`federation.runtime` must be flower"),
        ({"data": {"test": None}}, "`data.test` is required"),
        ({"attack": {"name": "sign_flip", "clients": ["noun.food"]}}, "`attack.name` cannot be used"),
        ({"eval": {"audit": {"canaries": 2}}}, "`eval.audit` cannot be used"),
        ({"privacy": {"sample_dp": {"target_epsilon": 8.0}}}, "`privacy.sample_dp.target_epsilon` cannot be solved"),
        ({"federation": {"runtime": "flower", "clients_per_round": 4}}, "must be <= `partition.num_clients` (3)"),
    ],
)
def test_node_local_refusals(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    config = node_local_config(tmp_path / "run", "/nowhere.jsonl")
    for section, values in change.items():
        config[section] = {**config.get(section, {}), **values}
    with pytest.raises(FedlmError) as refused:
        validate_config(config)
    assert message in str(refused.value)


def test_the_config_hash_ignores_the_nodes_own_data_paths_only_with_node_local(tmp_path: Path) -> None:
    server = validate_config(node_local_config(tmp_path / "run", "/server/has/none.jsonl"))
    node = validate_config(node_local_config(tmp_path / "node", "/hospital/a.jsonl", data={"test": "/other/test.jsonl"}))
    assert messages.config_hash(server) == messages.config_hash(node)
    other_length = validate_config(node_local_config(tmp_path / "node", "/hospital/a.jsonl", data={"max_length": 64}))
    assert "data.max_length (server 128, node 64)" in messages.config_difference(messages.shared_config(server), messages.shared_config(other_length))
    split = [validate_config(tiny_config(tmp_path / "run", data={"train": path}, federation={"runtime": "flower"})) for path in ("/a", "/b")]
    assert messages.config_hash(split[0]) != messages.config_hash(split[1])  # one dataset split: every node needs the same


def test_the_server_reads_no_client_data_and_a_node_holds_exactly_its_simulation_examples(tmp_path: Path) -> None:
    files = client_files(tmp_path / "data")
    server = build_session(validate_config(node_local_config(tmp_path / "run", str(tmp_path / "missing.jsonl"))), RunConsole(quiet=True))
    assert server.data.client_names == CLIENTS and all(server.data.client_train[c] == [] for c in CLIENTS)
    assert len(server.data.test) == 16 and all(ex.client is None for ex in server.data.test)
    node = build_session(validate_config(node_local_config(tmp_path / "run", str(files["noun.food"]))), RunConsole(quiet=True), "noun.food")
    assert list(node.data.client_train) == ["noun.food"] and node.data.test == []
    simulated = build_session(
        validate_config(
            tiny_config(tmp_path / "sim", data={"train": str(files["all"]), "test": "embedded:wordnet_defs/test", "max_train_examples": None})
        ),
        RunConsole(quiet=True),
    )
    assert simulated.data.client_names == CLIENTS
    mine, theirs = node.data.client_train["noun.food"], simulated.data.client_train["noun.food"]
    assert len(mine) == PER_CLIENT and [e.input_ids for e in mine] == [e.input_ids for e in theirs]
    assert [e.labels for e in mine] == [e.labels for e in theirs]
    with pytest.raises(FedlmError, match="client 'noun.plant' is not in `partition.clients`"):
        build_session(node.config, RunConsole(quiet=True), "noun.plant")


def test_a_supernode_checks_its_own_data_at_start(tmp_path: Path, runner) -> None:
    cfg = write_config(tmp_path / "c.yaml", node_local_config(tmp_path / "run", "/unused.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    result = runner.invoke(app, ["flower", "supernode", str(cfg), "--partition-id", "1", "--data", str(bad), "--superlink", "127.0.0.1:1"])
    assert result.exit_code == 2 and "question" in result.output and "instruction" in result.output, result.output
    result = runner.invoke(app, ["flower", "supernode", str(cfg), "--partition-id", "3", "--superlink", "127.0.0.1:1"])
    assert result.exit_code == 2 and "partition-id 3 is outside the federation: it has 3 clients" in result.output
    result = runner.invoke(
        app, ["flower", "supernode", str(cfg), "--partition-id", "0", "--data", str(tmp_path / "none.jsonl"), "--superlink", "127.0.0.1:1"]
    )
    assert result.exit_code == 2 and "none.jsonl" in result.output


def test_fltrust_needs_a_root_set_the_server_does_not_have(tmp_path: Path) -> None:
    config = validate_config(node_local_config(tmp_path / "run", "/unused.jsonl", aggregation={"name": "fltrust"}))
    with pytest.raises(FedlmError, match="server root set"):
        build_session(config, RunConsole(quiet=True))


@pytest.mark.slow
def test_three_nodes_with_their_own_files_end_with_the_simulation_adapter(tmp_path: Path) -> None:
    from typer.testing import CliRunner  # noqa: PLC0415

    from fedlm.runtime.flower.local import LocalFederation  # noqa: PLC0415

    files = client_files(tmp_path / "data")
    sim_dir = tmp_path / "sim"
    sim = write_config(
        tmp_path / "sim.yaml",
        tiny_config(sim_dir, data={"train": str(files["all"]), "test": "embedded:wordnet_defs/test", "max_train_examples": None}),
    )
    result = CliRunner().invoke(app, ["run", str(sim)])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    server = write_config(tmp_path / "server.yaml", node_local_config(run_dir, str(tmp_path / "server-has-no-train-data.jsonl")))
    fed = LocalFederation(tmp_path / "fed", server, [])
    try:
        fed.start()
        for pid, name in enumerate(CLIENTS):
            fed.start_node(pid, write_config(tmp_path / f"node{pid}.yaml", node_local_config(tmp_path / f"node{pid}", str(files[name]))))
        code = fed.run("--round-timeout", "300").wait(timeout=900)
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(fed.workdir.glob("*.log")))
        assert code == 0 and (run_dir / "adapter" / "adapter_model.safetensors").is_file(), logs
    finally:
        fed.stop()
    ours, theirs = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (run_dir, sim_dir))
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_the_flower_example_validates_on_the_server_and_on_a_node(tmp_path: Path, runner) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "flower" / "federation.yaml"
    from fedlm.config.io import load_config  # noqa: PLC0415

    server = load_config(str(example))
    assert server.partition.method == "node_local" and server.federation.runtime == "flower"
    files = client_files(tmp_path / "data")
    node = load_config(str(example), [f"data.train={files['noun.food']}"])
    assert messages.config_hash(server) == messages.config_hash(node)
    result = runner.invoke(
        app, ["flower", "supernode", str(example), "--partition-id", "7", "--data", str(files["noun.food"]), "--superlink", "127.0.0.1:1"]
    )
    assert result.exit_code == 2 and "partition-id 7 is outside the federation: it has 3 clients" in result.output
