"""A SuperNode's local training for one round: what both the plain train message and the secure one run.

The node's config (its own file or the bundle's), the client it serves, the session (base model, adapter, its data),
its memory from Flower's per-node ``context.state``, and the simulation's ``ClientTrainer`` on the task (with
``personalization.method``, the method around it: :mod:`fedlm.runtime.flower.node_personal`). Timings of the message
go into the update's metrics (see :mod:`fedlm.runtime.flower.client_app`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, RecordDict

from fedlm.compression.setup import seed_trainer, uplink_codec
from fedlm.compression.uplink import encode_on_client
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientUpdate
from fedlm.runtime.flower import node_cache
from fedlm.runtime.flower.messages import config_hash, pack_tensors, task_from_content, unpack_tensors
from fedlm.runtime.flower.node_replica import synced_task
from fedlm.runtime.flower.task_clock import task_pull_s, task_started_at

MEMORY = "fedlm_memory"


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
    process_s = time.time() - task_started_at()  # a fresh process: spawn and imports; the long-lived one: pulling the task
    config = node_config_of(context.node_config, context.run_config)
    client = client_of(context.node_config.get("partition-id"), client_names(config))
    session, load_s, reused = _session(config, client)
    memory = unpack_tensors(context.state.array_records[MEMORY]) if MEMORY in context.state.array_records else {}
    wanted, server_hash, task = task_from_content(content, memory, session.initial_state)
    if server_hash != config_hash(config):
        raise FedlmError("the node's config differs from the server's (config hash); restart the node with the server's config")
    if wanted != client:
        raise FedlmError(f"this node serves client {client}, not {wanted}")
    task = synced_task(task, context, config, session.initial_state)  # a broadcast downlink: from the node's replica
    aggregator = session.aggregator()
    aggregator.start(session.data.client_names)
    trainer = seed_trainer(session.trainer(aggregator.trainer_hooks()), config)  # fedkseed: zeroth-order steps
    if config.federation.client_processes > 1:  # one client on several processes: rank 0 here talks to the server
        trainer = _processes(config, client, session).trainer(trainer)
    setup_s = time.perf_counter() - started

    def run(sent: ClientTask) -> ClientUpdate:
        return trainer.train(client, session.data.client_train[client], sent.state, sent.plan, None, sent.context)

    if config.personalization.method is None:
        update = run(task)
    else:  # the personal method around the training, its state in the node's state directory
        from fedlm.runtime.flower.node_personal import personal_round  # noqa: PLC0415 - heavy imports only where training happens

        update = personal_round(content, context, session, client, task, run)
    train_s = time.perf_counter() - started - setup_s
    codec = uplink_codec(config)
    if codec is not None:  # compression.uplink: the message leaves the node encoded; the residual stays here
        update = encode_on_client(update, codec, config.seed, task.plan.rank, task.context.memory)
    if update.memory:
        context.state[MEMORY] = pack_tensors(update.memory)
    metrics = {
        **update.metrics,
        "process_start_s": process_s,
        "model_load_s": load_s,
        "session_reused": float(reused),
        "setup_s": setup_s,
        "local_train_s": train_s,
        "clientapp_s": time.perf_counter() - started + process_s,
    }
    pulled = task_pull_s()
    if pulled is not None:
        metrics["task_pull_s"] = pulled
    update = type(update)(update.client_id, update.round, update.num_examples, update.tensors, metrics, update.extras)
    return LocalRound(update, task, config, session, aggregator)


def build_node_session(config: ExperimentConfig, client: str) -> Any:
    """The node's session (base model with adapter, its data) built from scratch."""
    from fedlm.experiment import build_session  # noqa: PLC0415 - heavy imports only where training happens
    from fedlm.reporting.progress import RunConsole  # noqa: PLC0415

    return build_session(config, RunConsole(quiet=True), node_client=client if config.partition.method == "node_local" else None)


def _processes(config: ExperimentConfig, client: str, session: Any) -> Any:
    """The client's data-parallel worker processes (ranks 1..N-1, :mod:`fedlm.federation.data_parallel`), started
    once per ClientApp process: once per run with the long-lived worker, once per message with a fresh process."""
    from functools import partial  # noqa: PLC0415

    from fedlm.experiment import client_process_model  # noqa: PLC0415 - heavy imports only where training happens
    from fedlm.federation.data_parallel import ClientProcesses  # noqa: PLC0415

    n = config.federation.client_processes
    return node_cache.processes(config, client, lambda: ClientProcesses(n, partial(client_process_model, config), session.loaded.device))


def node_session(config: ExperimentConfig, client: str) -> Any:
    """The node's session for ``client`` (kept from an earlier message of this process, else built)."""
    return _session(config, client)[0]


def _session(config: ExperimentConfig, client: str) -> tuple[Any, float, bool]:
    """(session, seconds the base model took to load in this message, whether the session was kept from an earlier
    message of this process)."""
    kept_for = client if config.partition.method == "node_local" else ""  # else one session serves every client (a Ray worker)
    session, reused = node_cache.session(config, kept_for, lambda: build_node_session(config, client))
    return session, 0.0 if reused else session.loaded.load_s, reused
