"""``federation.runtime: flower-simulation``: fedlm's Flower ServerApp and ClientApp on Flower's Simulation Engine
with its Ray backend, started in this process by ``fedlm run``.

Flower registers one virtual SuperNode per client (``partition-id`` = the client's index, as a deployment's
``--node-config``) and runs their ClientApps in a pool of Ray workers, each reserving
``federation.simulation_engine.num_cpus`` cores and ``num_gpus`` GPUs (Flower's ``client_resources``): as many
clients train at once as workers fit on this machine, or on a Ray cluster joined with ``address``
(``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the others). Flower's engine does the
scheduling; fedlm only sizes and starts it. The ServerApp runs in a thread of this process with a Grid over Flower's
in-memory link state; its runtime returns the replies in the simulation's client order, so the final adapter is the
in-process simulation's for the same config and seed.

The run config reaches both apps as in a deployment: the app bundle (:func:`fedlm.runtime.flower.launch.write_bundle`)
is the app directory of the run, read by Flower for every virtual node. A Ray worker is long-lived and keeps its
session (base model, data) between messages (:mod:`fedlm.runtime.flower.node_train`). A worker that dies in the
middle of a round (killed, out of memory) makes its client a failed, unreachable client of that round (Ray does not
retry the message: ``max_task_retries: 0``); Ray restarts the worker (``max_restarts: -1``) for the next messages.

Flower 1.41's public ``run_simulation`` has no run config; this module calls ``_run_simulation``, the function Flower's
own ``flwr-simulation`` process calls with an app directory (flwr is pinned to 1.41.0 in ``pyproject.toml``).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import get_fused_config_from_dir
from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.telemetry import EventType

from fedlm.config.schema import ExperimentConfig
from fedlm.config.schema.federation import SimulationEngineConfig
from fedlm.core.errors import FedlmError
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import prepare_run_dir
from fedlm.runtime.flower import client_app, server_app
from fedlm.runtime.flower.client_app import client_names
from fedlm.runtime.flower.launch import Deployment, write_bundle

#: Ray actor options beside the resources: restart a dead worker for later messages, never re-run the message
#: it died on (that client fails the round, as a dead SuperNode's client does).
WORKER_RESTARTS: dict[str, int] = {"max_restarts": -1, "max_task_retries": 0}
#: Environment variables a client's worker takes from this process (same dtype choice, caches and model files).
FORWARDED_ENV = ("FEDLM_AUTO_DTYPE", "FEDLM_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def backend_config(engine: SimulationEngineConfig) -> dict[str, Any]:
    """Flower's ``backend_config`` for the Ray backend: each client worker's resources and restart policy."""
    resources: dict[str, Any] = {"num_cpus": engine.num_cpus, "num_gpus": engine.num_gpus, **WORKER_RESTARTS}
    return {"client_resources": resources, "init_args": {"logging_level": logging.WARNING, "log_to_driver": False}}


def worker_env(engine: SimulationEngineConfig) -> dict[str, str]:
    """The environment of the clients' Ray workers: this process's import path (as Flower's Ray backend sets it),
    one torch thread per reserved core, and fedlm's settings (:data:`FORWARDED_ENV`)."""
    path = os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    threads = str(max(1, int(engine.num_cpus)))
    env = {"PYTHONPATH": path, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    return env | {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


@contextmanager
def ray_session(engine: SimulationEngineConfig) -> Iterator[int]:
    """Start Ray on this machine (``ray_cpus`` cores, no dashboard) or join the cluster at ``address``; yields how
    many client workers fit (Flower's own count); shuts Ray down afterwards. Refuses, before any client runs, a
    per-client reservation that no Ray node can give."""
    if ray.is_initialized():
        raise FedlmError("Ray is already running in this process; `federation.runtime: flower-simulation` starts (or joins) its own")
    common: dict[str, Any] = {"runtime_env": {"env_vars": worker_env(engine)}, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        with warnings.catch_warnings():  # Ray's tip that a future Ray stops hiding GPUs from workers with num_gpus 0
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            if engine.address is not None:
                ray.init(address=engine.address, **common)
            else:
                ray.init(num_cpus=engine.ray_cpus or os.cpu_count(), include_dashboard=False, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise FedlmError(
            f"`federation.simulation_engine.address: {engine.address}`: cannot join the Ray cluster ({exc}); start it with `ray start --head`"
        ) from exc
    try:
        yield _workers(engine)
    finally:
        ray.shutdown()


def _workers(engine: SimulationEngineConfig) -> int:
    """How many client workers the Ray cluster holds (Flower's count, per node); FedlmError when none fits."""
    total = ray.cluster_resources()
    if engine.num_gpus > total.get("GPU", 0):
        raise FedlmError(
            f"`federation.simulation_engine.num_gpus: {engine.num_gpus:g}` per client but the Ray cluster has {total.get('GPU', 0):g} GPU(s); "
            "lower it (0.5: two clients per GPU) or add GPU nodes to the cluster"
        )
    try:
        return pool_size_from_resources({"num_cpus": engine.num_cpus, "num_gpus": engine.num_gpus})
    except ValueError:
        raise FedlmError(
            f"no Ray node has {engine.num_cpus:g} CPU cores and {engine.num_gpus:g} GPUs free for one client "
            f"(the cluster: {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs); lower `federation.simulation_engine.num_cpus` or `num_gpus`"
        ) from None


@contextmanager
def _flower_log_kept_apart() -> Iterator[None]:
    """Flower's log lines go to Flower's own console handler only, not also to a root handler Ray may add."""
    logger = logging.getLogger("flwr")
    before = logger.propagate
    logger.propagate = False
    try:
        yield
    finally:
        logger.propagate = before


def run_on_simulation_engine(config: ExperimentConfig, resume: bool = False, overwrite: bool = False, app: ClientApp | None = None) -> None:
    """Run (or resume) ``config`` on Flower's Simulation Engine; results in ``config.output_dir`` as ``fedlm run``.

    ``app`` replaces fedlm's ClientApp (tests inject faults with it)."""
    if config.federation.runtime != "flower-simulation":
        raise FedlmError("the simulation engine runs `federation.runtime: flower-simulation` (add --set federation.runtime=flower-simulation)")
    prepare_run_dir(config.output_dir, resume=resume, overwrite=overwrite)  # refuse a used output_dir before Ray starts
    engine = config.federation.simulation_engine
    num_clients = len(client_names(config))
    # every virtual node exists from the start: wait for all of them to answer the handshake (their workers' imports)
    deployment = Deployment(resume, overwrite, round_timeout_s=engine.round_timeout_s, min_nodes=0, wait_for_nodes_s=engine.round_timeout_s)
    with tempfile.TemporaryDirectory(prefix="fedlm-sim-") as work, ray_session(engine) as workers, _flower_log_kept_apart():
        bundle = write_bundle(config, Path(work) / "app", deployment)
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=get_fused_config_from_dir(bundle, {}))
        RunConsole().print(
            f"flower-simulation: {num_clients} clients on {workers} Ray workers ({engine.num_cpus:g} CPUs, {engine.num_gpus:g} GPUs each)"
        )
        _run_simulation(
            num_supernodes=num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=app or client_app.app,
            server_app=server_app.app,
            backend_config=backend_config(engine),
            app_dir=str(bundle),
            is_app=True,
            server_app_context=context,
        )
