"""fedlm on Flower's Deployment Engine: real SuperLink and SuperNode processes on 127.0.0.1.

Fast tests check the refusals in process (a partition id outside the federation at node start, a node whose config
differs from the server's, `fedlm run` of a flower config) and the wire format. One end-to-end run (3 SuperNodes,
2 rounds, the simulation's adapter) is in the default suite too, so CI runs a real deployment; the ``slow`` ones start
a SuperLink and SuperNodes as subprocesses (minutes on 2 cores; each SuperNode with fedlm's long-lived ClientApp process) and check
that a Flower run ends with the simulation's adapter, survives a killed SuperNode and a killed server.
Every process a test starts is stopped by PID in a ``finally`` (``LocalFederation.stop``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_config, write_config
from e2e_runs import final_adapter, run_records
from flower_runs import run_on_supernodes

from fedlm.cli import app
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.core.task import ClientContext, ClientTask, LocalPlan
from fedlm.core.update import ClientUpdate
from fedlm.runtime.flower import client_app, messages
from fedlm.runtime.flower.local import LocalFederation, wait_for

ATOL = 0.0  # bit for bit: the Flower runtime returns the updates in the simulation's order (float sums do not commute)


def flower_config(output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny model, 3 clients (iid), all of them every round, 2 rounds, on the Flower runtime."""
    config = tiny_config(output_dir, partition={"method": "iid", "num_clients": 3, "field": None}, federation={"runtime": "flower"})
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= ATOL, f"adapters differ by {worst}"


# ---------------------------------------------------------------- fast: refusals and the wire format


def test_partition_id_outside_the_federation_is_refused_at_node_start(tmp_path: Path, runner) -> None:
    cfg = write_config(tmp_path / "c.yaml", flower_config(tmp_path / "run"))
    result = runner.invoke(app, ["flower", "supernode", str(cfg), "--partition-id", "3", "--superlink", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "partition-id 3 is outside the federation: it has 3 clients (partition-id 0..2" in result.output


def test_fedlm_run_of_a_flower_config_says_what_to_run(tmp_path: Path, runner) -> None:
    cfg = write_config(tmp_path / "c.yaml", flower_config(tmp_path / "run"))
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2
    assert "fedlm flower superlink" in result.output and "fedlm flower run" in result.output


def _check(server: dict[str, Any], node: dict[str, Any], partition_id: int) -> tuple[str, int]:
    """The node's answer to the server's handshake (what the ClientApp's hello handler replies)."""
    hello = messages.meta(messages.hello_content(validate_config(server)))
    return client_app.check_node(hello, {"partition-id": partition_id}, {"fedlm-config": yaml.safe_dump(node)})


def test_a_node_with_a_different_config_is_refused_naming_the_difference(tmp_path: Path) -> None:
    server = flower_config(tmp_path / "run")
    node = flower_config(tmp_path / "elsewhere", peft={"r": 8})  # a different output_dir is fine, a different rank is not
    with pytest.raises(FedlmError) as refused:
        _check(server, node, 0)
    assert "the node's config differs from the server's in peft.r (server 4, node 8)" == str(refused.value)
    assert _check(server, flower_config(tmp_path / "elsewhere"), 2) == ("2", 2)
    with pytest.raises(FedlmError, match="partition-id 5 is outside the federation"):
        _check(server, server, 5)


def test_secure_aggregation_over_flower_is_accepted_since_it_runs_on_the_nodes(tmp_path: Path) -> None:
    config = validate_config(flower_config(tmp_path / "run", privacy={"secure_aggregation": {}}))  # test_secagg_flower*.py
    assert config.privacy.secure_aggregation is not None and config.federation.runtime == "flower"


def test_task_and_update_cross_the_wire_exactly_cut_to_rank() -> None:
    config = validate_config(flower_config(Path("/tmp/x")))
    state = {"m.lora_A.weight": torch.randn(4, 6), "m.lora_B.weight": torch.randn(6, 4), "norm": torch.randn(6, dtype=torch.bfloat16)}
    truncated = {
        **state,
        "m.lora_A.weight": torch.cat([state["m.lora_A.weight"][:2], torch.zeros(2, 6)]),
        "m.lora_B.weight": torch.cat([state["m.lora_B.weight"][:, :2], torch.zeros(6, 2)], dim=1),
    }
    task = ClientTask(LocalPlan(2, [0.1, 0.05], 4, 123, rank=2), truncated, ClientContext("c", 2, {}, {"secret": torch.ones(1)}, 2))
    content = messages.task_content("c", task, config)
    assert "secret" not in str(content)  # the client's memory never travels
    client, digest, back = messages.task_from_content(content, {"mine": torch.zeros(1)}, state)
    assert (client, digest, back.plan) == ("c", messages.config_hash(config), task.plan)
    assert all(torch.equal(back.state[k], truncated[k]) for k in state) and back.state["norm"].dtype == torch.bfloat16
    assert set(back.context.memory) == {"mine"}
    update = ClientUpdate("c", 2, 80, {k: v.float() for k, v in truncated.items()}, {"loss": 1.5})
    again = messages.update_from_content(messages.update_content(update, 2), state)
    assert again.num_examples == 80 and again.metrics == {"loss": 1.5}
    assert all(torch.equal(again.tensors[k], update.tensors[k]) for k in state)


# ---------------------------------------------------------------- slow: real processes


@pytest.fixture(scope="module")
def simulation_adapter(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The simulation runtime's final adapter for the same config and seed."""
    from typer.testing import CliRunner  # noqa: PLC0415

    root = tmp_path_factory.mktemp("sim")
    cfg = write_config(root / "c.yaml", flower_config(root / "run", federation={"runtime": "simulation"}))
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    return final_adapter(root / "run")


def _finished(run_dir: Path) -> bool:
    return (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def _logs(fed: LocalFederation) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(fed.workdir.glob("*.log")))


def _run_three_nodes(tmp_path: Path, cfg: Path, run_dir: Path) -> None:
    """A SuperLink and SuperNodes for partitions 0-2 run ``cfg`` to its end; every process is stopped after."""
    run_on_supernodes(tmp_path / "fed", cfg, run_dir)


def test_three_supernodes_end_with_the_simulation_adapter(tmp_path: Path, simulation_adapter: dict[str, torch.Tensor]) -> None:
    run_dir = tmp_path / "run"
    _run_three_nodes(tmp_path, write_config(tmp_path / "c.yaml", flower_config(run_dir)), run_dir)
    assert_same_adapter(final_adapter(run_dir), simulation_adapter)
    trains = [r for r in run_records(run_dir) if r["split"] == "train"]
    assert sorted((r["round"], r["client"]) for r in trains) == [(1, "0"), (1, "1"), (1, "2"), (2, "0"), (2, "1"), (2, "2")]
    assert all(r["model_load_s"] >= 0 for r in trains)
    # the long-lived ClientApp process kept each node's model, tokenizer and data from round 1
    assert all(r["session_reused"] == 1.0 and r["model_load_s"] == 0.0 for r in trains if r["round"] == 2), trains
    # the nodes were waited for and greeted before round 1 (the run's start), not inside round 1's train time
    rows = run_records(run_dir)
    events = [(r["split"], r.get("event")) for r in rows if r["split"] in ("flower", "train")]
    connected = events.index(("flower", "connected"))
    assert events[:connected] == [("flower", "joined")] * 3 and ("train", None) not in events[:connected]
    assert next(r for r in rows if r.get("event") == "connected")["nodes"] == 3


def _round_done(run_dir: Path, round_num: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and any(r["split"] == "aggregate" and r["round"] == round_num for r in run_records(run_dir))


@pytest.mark.slow
def test_client_and_sample_dp_over_flower_end_with_the_simulation_adapter(tmp_path: Path) -> None:
    """DP-SGD on the nodes (seeded per client and round) and central client DP on the server give the simulation's
    adapter: the noise is drawn from the same seeds wherever the code runs."""
    from typer.testing import CliRunner  # noqa: PLC0415

    privacy = {"client_dp": {"noise_multiplier": 0.5, "clip": 0.05}, "sample_dp": {"noise_multiplier": 0.8, "max_grad_norm": 1.0}}
    sim_dir, run_dir = tmp_path / "sim", tmp_path / "run"
    sim = write_config(tmp_path / "sim.yaml", flower_config(sim_dir, federation={"runtime": "simulation"}, privacy=privacy))
    result = CliRunner().invoke(app, ["run", str(sim)])
    assert result.exit_code == 0, result.output
    _run_three_nodes(tmp_path, write_config(tmp_path / "c.yaml", flower_config(run_dir, privacy=privacy)), run_dir)
    assert_same_adapter(final_adapter(run_dir), final_adapter(sim_dir))
    flower_rows, sim_rows = run_records(run_dir), run_records(sim_dir)
    eps = lambda rows: [r["aggregation"]["epsilon"] for r in rows if r["split"] == "aggregate"]  # noqa: E731
    assert eps(flower_rows) == eps(sim_rows) and all(e > 0 for e in eps(flower_rows))
    sample_eps = lambda rows: sorted((r["round"], r["client"], r["sample_epsilon"]) for r in rows if r["split"] == "train")  # noqa: E731
    assert sample_eps(flower_rows) == sample_eps(sim_rows)


def _kill_client_2_in_round_2(tmp_path: Path, cfg: Path, run_dir: Path, *, restart: bool, extra_node: Path | None = None) -> None:
    """Nodes 0-2 run ``cfg``; once round 1 is aggregated the node of client "2" (and its ClientApp) is killed, and
    with ``restart`` started again as a new node; the run must still end. ``extra_node``: a fourth node's config."""
    from fedlm.runtime.flower.local import kill_tree  # noqa: PLC0415

    fed = LocalFederation(tmp_path / "fed", cfg, [0, 1, 2])
    try:
        fed.start()
        if extra_node is not None:
            fed.start_node(0, extra_node)
        run = fed.run("--round-timeout", "300")
        wait_for(lambda: _round_done(run_dir, 1) or run.poll() is not None, 600, "round 1")
        kill_tree(fed.nodes[2])  # Flower reports the node unavailable after the heartbeat patience
        if restart:
            fed.start_node(2)
        code = run.wait(timeout=900)
        assert code == 0 and _finished(run_dir), _logs(fed)
    finally:
        fed.stop()


@pytest.mark.slow
def test_a_supernode_killed_in_round_2_and_a_mismatched_node(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", flower_config(run_dir))
    other = write_config(tmp_path / "other.yaml", flower_config(run_dir, peft={"r": 8}))  # a fourth node, another rank
    _kill_client_2_in_round_2(tmp_path, cfg, run_dir, restart=False, extra_node=other)
    rows = run_records(run_dir)
    round2 = next(r for r in rows if r["split"] == "aggregate" and r["round"] == 2)
    assert round2["num_updates"] == 2 and not round2["skipped"]
    assert [f["client"] for f in round2["rejected"]] == ["2"], round2["rejected"]
    refused = [r for r in rows if r["split"] == "flower" and r.get("event") == "refused"]
    assert refused and "peft.r (server 4, node 8)" in refused[0]["reason"]


@pytest.mark.slow
def test_a_supernode_restarted_in_round_2_is_retried_and_the_run_ends_as_if_nothing_failed(
    tmp_path: Path, simulation_adapter: dict[str, torch.Tensor]
) -> None:
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", flower_config(run_dir, federation={"min_clients": 3, "round_retries": 4, "retry_wait_s": 10}))
    _kill_client_2_in_round_2(tmp_path, cfg, run_dir, restart=True)
    assert_same_adapter(final_adapter(run_dir), simulation_adapter)  # the retried client trained its same task
    rows = run_records(run_dir)
    retries = [r for r in rows if r["split"] == "retry"]
    assert retries and {r["round"] for r in retries} == {2} and retries[0]["clients"] == ["2"], retries
    round2 = next(r for r in rows if r["split"] == "aggregate" and r["round"] == 2)
    assert round2["num_updates"] == 3 and not round2["skipped"] and round2["rejected"] == []


@pytest.mark.slow
def test_server_killed_after_round_1_resumes_to_the_uninterrupted_adapter(tmp_path: Path, simulation_adapter: dict[str, torch.Tensor]) -> None:
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", flower_config(run_dir))
    fed = LocalFederation(tmp_path / "fed", cfg, [0, 1, 2])
    try:
        fed.start()
        first = fed.run("--round-timeout", "300")
        wait_for(
            lambda: (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()) or first.poll() is not None,
            600,
            "the round-1 checkpoint",
        )
        fed.kill_superlink()  # the SuperLink, its SuperExec and the ServerApp, mid-round 2
        first.wait(timeout=60)
        assert not _finished(run_dir)
        fed.start_superlink()  # same port: the SuperNodes reconnect
        code = fed.run("--resume", "--round-timeout", "300").wait(timeout=900)
        assert code == 0 and _finished(run_dir), _logs(fed)
    finally:
        fed.stop()
    assert_same_adapter(final_adapter(run_dir), simulation_adapter)
    aggregates = [r["round"] for r in run_records(run_dir) if r["split"] == "aggregate"]
    assert aggregates == [1, 2]


@pytest.mark.slow
def test_tls_and_node_authentication_refuse_an_unregistered_key(tmp_path: Path, simulation_adapter: dict[str, torch.Tensor]) -> None:
    import subprocess  # noqa: PLC0415

    from fedlm.runtime.flower.certs import create_credentials  # noqa: PLC0415
    from fedlm.runtime.flower.launch import Tls  # noqa: PLC0415

    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", flower_config(run_dir))
    creds = create_credentials(tmp_path / "creds", 4)
    keys = dict(enumerate(creds.node_keys[:3]))
    fed = LocalFederation(tmp_path / "fed", cfg, [0, 1, 2], Tls(creds.ca_cert, creds.server_cert, creds.server_key), True, keys)
    try:
        fed.start_superlink()
        for key in creds.node_keys[:3]:  # node3's key is never registered
            register = fed.fedlm("flower", "register", f"{key}.pub", "--superlink", fed.address, "--ca-cert", str(creds.ca_cert))
            wait_for(lambda r=register: subprocess.run(r, env=fed.env, capture_output=True).returncode == 0, 60, f"registering {key.name}", 2)
        for pid in (0, 1, 2):
            fed.start_node(pid)
        fed.node_keys[0] = creds.node_keys[3]
        intruder = fed.start_node(0)
        assert intruder.wait(timeout=120) != 0  # the SuperLink refuses to activate it; the process exits
        assert "Failed to activate SuperNode" in (fed.workdir / "supernode0-3.log").read_text()
        code = fed.run("--round-timeout", "300").wait(timeout=900)
        assert code == 0 and _finished(run_dir), _logs(fed)
    finally:
        fed.stop()
    assert_same_adapter(final_adapter(run_dir), simulation_adapter)


def test_certs_make_a_ca_a_server_certificate_and_node_keys_flower_accepts(tmp_path: Path) -> None:
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key  # noqa: PLC0415
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve  # noqa: PLC0415

    from fedlm.runtime.flower.certs import create_credentials  # noqa: PLC0415

    creds = create_credentials(tmp_path, 2, ["10.0.0.5"])
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    assert server.issuer == ca.subject
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.5"}
    for key in creds.node_keys:  # the formats flower-supernode and `flwr supernode register` load
        assert uses_nist_ec_curve(load_ssh_public_key(Path(f"{key}.pub").read_bytes()))
        load_ssh_private_key(key.read_bytes(), None)


def test_flower_processes_find_this_environments_scripts_without_an_activated_venv() -> None:
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from fedlm.runtime.flower.launch import with_scripts_on_path  # noqa: PLC0415

    scripts = str(Path(sys.executable).parent)
    env = with_scripts_on_path({"PATH": "/usr/bin:/bin"})
    assert env["PATH"].split(os.pathsep) == [scripts, "/usr/bin", "/bin"]
    assert with_scripts_on_path(env) == env  # idempotent
    assert (Path(scripts) / "flower-superexec").exists()  # what the SuperLink starts by name
