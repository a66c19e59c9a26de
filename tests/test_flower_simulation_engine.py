"""fedlm's Flower apps on Flower's Simulation Engine with the Ray backend (`federation.runtime: flower-simulation`).

Fast tests check the refusals at load (resources Ray could not give, what the engine cannot run) and how a dead Ray
worker's error reply is read. One end-to-end run in the default suite: `fedlm run` of a flower-simulation config
(3 clients on 2 Ray workers, one core each) ends with the in-process simulation's adapter, bit for bit. The slow ones
kill a worker in the middle of round 2 (a failed client, retried on the restarted worker) and run SmolLM2-135M.
Ray runs under a short temporary directory (``RAY_TMPDIR``) and is shut down by the run itself.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_config, write_config
from e2e_runs import final_adapter, run_records
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlm.cli import app
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.models import hardware
from fedlm.runtime.flower import client_app, messages
from fedlm.runtime.flower.runtime import worker_died

ENGINE = {"num_cpus": 1, "ray_cpus": 2}  # 2 workers of one core each, whatever the machine


def engine_config(output_dir: Path, runtime: str = "flower-simulation", **federation: Any) -> dict[str, Any]:
    """The tiny model, 3 clients (iid), all of them every round, 2 rounds, on ``runtime``."""
    fed = {"runtime": runtime, "simulation_engine": ENGINE, **federation}
    return tiny_config(output_dir, partition={"method": "iid", "num_clients": 3, "field": None}, federation=fed)


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"adapters differ in {differ[:3]} (by {max(float((a[k] - b[k]).abs().max()) for k in differ)})"


@pytest.fixture
def ray_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short temporary directory for Ray's session files (its socket paths must stay under 108 characters)."""
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as path:
        monkeypatch.setenv("RAY_TMPDIR", path)
        yield Path(path)


# ---------------------------------------------------------------- fast: refusals at load


def _refusal(tmp_path: Path, **federation: Any) -> str:
    config = engine_config(tmp_path / "run", **federation)
    with pytest.raises(FedlmError) as info:
        validate_config(config)
    return str(info.value)


def test_gpus_when_torch_sees_none_are_refused_at_load_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware.torch.cuda, "device_count", lambda: 0)
    reason = _refusal(tmp_path, simulation_engine={**ENGINE, "num_gpus": 0.5})
    assert "`federation.simulation_engine.num_gpus: 0.5` but no CUDA GPU is visible" in reason and "set it to 0" in reason


def test_more_gpus_per_client_than_the_machine_has_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware.torch.cuda, "device_count", lambda: 2)
    reason = hardware.engine_refusal(1.0, 3.0, None, None, "auto")
    assert reason is not None and "this machine has 2 GPU(s); use at most 2" in reason
    assert hardware.engine_refusal(1.0, 0.5, None, None, "auto") is None  # two clients share a GPU
    assert hardware.engine_refusal(1.0, 2.0, None, None, "cuda") is None


def test_cores_and_devices_ray_cannot_give_are_refused(tmp_path: Path) -> None:
    cores = os.cpu_count() or 1
    assert f"but Ray has {cores} CPU cores here, so no client could run" in _refusal(tmp_path, simulation_engine={"num_cpus": cores + 1})
    assert f"this machine has {cores} CPU cores" in _refusal(tmp_path, simulation_engine={"ray_cpus": cores + 1})
    assert "with `address` (auto) the cluster's nodes have their cores" in _refusal(tmp_path, simulation_engine={"ray_cpus": 1, "address": "auto"})
    assert "whole number of GPUs" in (hardware.engine_refusal(1.0, 1.5, None, None, "auto") or "")
    assert "Ray hides the GPUs" in (hardware.engine_refusal(1.0, 0.0, None, None, "cuda") or "")
    assert "each worker its own GPU as cuda:0" in (hardware.engine_refusal(1.0, 0.5, None, None, "cuda:1") or "")
    assert "never uses" in (hardware.engine_refusal(1.0, 0.5, None, None, "cpu") or "")
    assert hardware.engine_refusal(1.0, 0.0, None, "10.0.0.1:6379", "auto") is None  # a cluster's resources are checked when joining


def test_a_bad_cluster_address_and_data_parallel_clients_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FedlmError, match="simulation_engine.address"):
        validate_config(engine_config(tmp_path / "run", simulation_engine={"address": "ray://head"}))
    reason = _refusal(tmp_path, client_processes=2)
    assert "`federation.client_processes: 2` is not built for `federation.runtime: flower-simulation`" in reason


def test_a_dead_ray_worker_reads_as_an_unreachable_client() -> None:
    """The reason string as Flower's simulation worker builds it from the exception the Ray backend raises."""
    import ray.exceptions  # noqa: PLC0415

    for exc in (ray.exceptions.ActorUnavailableError("socket closed", None), ray.exceptions.ActorDiedError()):
        assert worker_died(str(type(exc)) + ":<'" + str(exc) + "'>")
    assert not worker_died("<class 'flwr.clientapp.client_app.ClientAppException'>:<'boom'>") and not worker_died(None)


# ---------------------------------------------------------------- end to end on Ray


def test_fedlm_run_on_the_simulation_engine_ends_with_the_simulation_adapter(tmp_path: Path, runner, one_torch_thread, ray_tmp: Path) -> None:
    sim_dir, run_dir = tmp_path / "sim", tmp_path / "run"
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "sim.yaml", engine_config(sim_dir, "simulation")))])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", engine_config(run_dir)))])
    assert result.exit_code == 0, result.output
    assert "3 clients on 2 Ray workers (1 CPUs, 0 GPUs each)" in result.output
    assert_same_adapter(final_adapter(run_dir), final_adapter(sim_dir))
    trains = [r for r in run_records(run_dir) if r["split"] == "train"]
    assert sorted((r["round"], r["client"]) for r in trains) == [(1, "0"), (1, "1"), (1, "2"), (2, "0"), (2, "1"), (2, "2")]
    assert sum(r["model_load_s"] > 0 for r in trains) <= 2  # one base model per Ray worker, kept between messages


# A ClientApp whose worker dies (os._exit) the first time it trains client "1" in round 2; otherwise fedlm's own.
dying_app = ClientApp()
dying_app.query("fedlm_hello")(client_app.hello)


@dying_app.train()
def _train_or_die(msg: Message, context: Context) -> Message:
    config = yaml.safe_load(str(context.run_config["fedlm-config"]))
    marker = Path(config["output_dir"]).parent / "worker-died"
    if messages.meta(msg.content)["round"] == 2 and context.node_config["partition-id"] == 1 and not marker.exists():
        marker.touch()
        os._exit(1)
    return client_app.train(msg, context)


@pytest.mark.slow
def test_a_worker_dying_mid_round_is_a_failed_client_retried_on_the_restarted_worker(tmp_path: Path, runner, one_torch_thread, ray_tmp: Path) -> None:
    from fedlm.runtime.flower.simulation_engine import run_on_simulation_engine  # noqa: PLC0415

    sim_dir, run_dir = tmp_path / "sim", tmp_path / "run"
    retry = {"min_clients": 3, "round_retries": 5, "retry_wait_s": 5.0}  # Ray restarts the worker meanwhile
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "sim.yaml", engine_config(sim_dir, "simulation", **retry)))])
    assert result.exit_code == 0, result.output
    run_on_simulation_engine(validate_config(engine_config(run_dir, **retry)), app=dying_app)
    assert (tmp_path / "worker-died").exists()
    assert_same_adapter(final_adapter(run_dir), final_adapter(sim_dir))  # the retried client trained its same task
    retries = [r for r in run_records(run_dir) if r["split"] == "retry"]
    # the client whose worker died, then (while Ray restarts the worker) maybe again with "the actor is restarting"
    assert retries and {(r["round"], tuple(r["clients"])) for r in retries} == {(2, ("1",))}, retries
    assert all("ray.exceptions.ActorUnavailableError" in r["reasons"]["1"] for r in retries), retries
    round2 = next(r for r in run_records(run_dir) if r["split"] == "aggregate" and r["round"] == 2)
    assert round2["num_updates"] == 3 and not round2["skipped"]


@pytest.mark.slow
def test_smollm2_on_the_simulation_engine_ends_with_the_simulation_adapter(tmp_path: Path, runner, one_torch_thread, ray_tmp: Path) -> None:
    """The real default model: 2 clients on 2 one-core Ray workers, one round, against the in-process simulation."""

    def config(out: Path, runtime: str) -> dict[str, Any]:
        return tiny_config(
            out,
            model={"name": "smollm2-135m-instruct", "dtype": "float32"},
            peft={"r": 8, "alpha": 16, "dropout": 0.0},
            data={"max_length": 96, "max_train_examples": 160},
            partition={"method": "iid", "num_clients": 2, "field": None},
            federation={"runtime": runtime, "simulation_engine": ENGINE, "rounds": 1, "clients_per_round": 2, "local_steps": 3, "lr": 0.002},
            eval={"max_examples": 8, "generate": False, "at_start": False},
        )

    sim_dir, run_dir = tmp_path / "sim", tmp_path / "run"
    for out, runtime in ((sim_dir, "simulation"), (run_dir, "flower-simulation")):
        result = runner.invoke(app, ["run", str(write_config(tmp_path / f"{runtime}.yaml", config(out, runtime)))])
        assert result.exit_code == 0, result.output
    assert_same_adapter(final_adapter(run_dir), final_adapter(sim_dir))
    assert sorted(r["client"] for r in run_records(run_dir) if r["split"] == "train") == ["0", "1"]


@pytest.mark.slow
def test_secure_aggregation_on_the_simulation_engine_ends_with_the_simulation_adapter(
    tmp_path: Path, runner, one_torch_thread, ray_tmp: Path
) -> None:
    """SecAgg+ between the ServerApp and the ClientApps in Ray workers (key stages and masked inputs as messages,
    each node's secrets in its Flower context): the simulation's secure adapter, bit for bit."""
    secure = {"privacy": {"secure_aggregation": {"max_weight": 64}}, "eval": {"every": 0, "generate": False, "max_examples": 8, "at_start": False}}
    sim_dir, run_dir = tmp_path / "sim", tmp_path / "run"
    for out, runtime in ((sim_dir, "simulation"), (run_dir, "flower-simulation")):
        config = {**engine_config(out, runtime), **secure}
        result = runner.invoke(app, ["run", str(write_config(tmp_path / f"{runtime}.yaml", config))])
        assert result.exit_code == 0, result.output
    assert_same_adapter(final_adapter(run_dir), final_adapter(sim_dir))
