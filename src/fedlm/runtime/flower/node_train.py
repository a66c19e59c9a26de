"""A SuperNode's local training for one round: what both the plain train message and the secure one run.

The node's config (its own file or the bundle's), the client it serves, the session (base model, adapter, its data),
its memory from Flower's per-node ``context.state``, and the simulation's ``ClientTrainer`` on the task. Timings of
the message go into the update's metrics (see :mod:`fedlm.runtime.flower.client_app`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import psutil
from flwr.app import Context, RecordDict

from fedlm.config.io import config_to_dict
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientUpdate
from fedlm.runtime.flower.messages import config_hash, pack_tensors, task_from_content, unpack_tensors

MEMORY = "fedlm_memory"
_SESSIONS: dict[tuple[str, str | None], Any] = {}  # this process's session, by config and node client
_STARTED = False  # whether this process has handled a message


@dataclass
class LocalRound:
    """What a node's training produced: the update (with timing metrics), the task, the node's config and session."""

    update: ClientUpdate
    task: ClientTask
    config: ExperimentConfig
    session: Any  # fedlm.experiment.Session (heavy import kept out of this module)
    aggregator: Any  # the run's aggregator as the node builds it (DP wrapper included)


def train_on_node(content: RecordDict, context: Context) -> LocalRound:
    """Train this node's client on the task in ``content``; raises :class:`FedlmError` (refused: config, client)
    or ``NonFiniteLossError`` (failed training). The client's new memory is kept in ``context.state``."""
    from fedlm.runtime.flower.client_app import client_names, client_of, node_config_of  # noqa: PLC0415 - no cycle at import

    started = time.perf_counter()
    process_s = _process_start_s()
    config = node_config_of(context.node_config, context.run_config)
    client = client_of(context.node_config.get("partition-id"), client_names(config))
    session, load_s = _session(config, client)
    memory = unpack_tensors(context.state.array_records[MEMORY]) if MEMORY in context.state.array_records else {}
    wanted, server_hash, task = task_from_content(content, memory, session.initial_state)
    if server_hash != config_hash(config):
        raise FedlmError("the node's config differs from the server's (config hash); restart the node with the server's config")
    if wanted != client:
        raise FedlmError(f"this node serves client {client}, not {wanted}")
    aggregator = session.aggregator()
    aggregator.start(session.data.client_names)
    trainer = session.trainer(aggregator.trainer_hooks())
    setup_s = time.perf_counter() - started
    update = trainer.train(client, session.data.client_train[client], task.state, task.plan, None, task.context)
    train_s = time.perf_counter() - started - setup_s
    if update.memory:
        context.state[MEMORY] = pack_tensors(update.memory)
    metrics = {
        **update.metrics,
        "process_start_s": process_s,
        "model_load_s": load_s,
        "setup_s": setup_s,
        "local_train_s": train_s,
        "clientapp_s": time.perf_counter() - started + process_s,
    }
    update = type(update)(update.client_id, update.round, update.num_examples, update.tensors, metrics, update.extras)
    return LocalRound(update, task, config, session, aggregator)


def _process_start_s() -> float:
    """Seconds from this process's start to its first message (Flower's fresh ClientApp process: spawn and
    imports); 0 for every later message of a long-lived process (a Ray worker of the simulation engine)."""
    global _STARTED  # noqa: PLW0603 - once per process
    if _STARTED:
        return 0.0
    _STARTED = True
    return time.time() - psutil.Process().create_time()


def _session(config: ExperimentConfig, client: str) -> tuple[Any, float]:
    """The node's session (base model with adapter, its data) and the seconds the base model took to load (0 when
    this process built it for an earlier message: a Ray worker of the simulation engine serves many messages and
    many clients, with one base model, as the in-process simulation does)."""
    from fedlm.experiment import build_session  # noqa: PLC0415 - heavy imports only where training happens
    from fedlm.reporting.progress import RunConsole  # noqa: PLC0415

    node_client = client if config.partition.method == "node_local" else None
    key = (json.dumps(config_to_dict(config), sort_keys=True, default=str), node_client)
    if key in _SESSIONS:
        return _SESSIONS[key], 0.0
    _SESSIONS.clear()  # one session per process: a new config replaces the old one
    session = build_session(config, RunConsole(quiet=True), node_client=node_client)
    _SESSIONS[key] = session
    return session, session.loaded.load_s
