"""Personalization on a SuperNode: the client's personal state lives on its node, never on the server.

A node keeps its client's store (:class:`~fedlm.personalization.store.ClientStore`) under its state directory
(``fedlm flower supernode --state-dir DIR``, the node-config key ``fedlm-state-dir``), in
``DIR/<config hash>/clients/<name>/`` (the layout of the simulation's ``RUN_DIR/clients/<name>/``; the hash of the
shared config keeps two federations on one node apart). Each round the configured method runs around the node's
local training exactly as in the simulation (:func:`~fedlm.personalization.runtime.train_personal`: prepare,
around, train, after); only what the method uploads there leaves the node (e.g. FedSA-LoRA's A factors).

The server's messages say where the run (re)started and which checkpoint rounds it keeps (:data:`PERSONAL_META`):
at its first message of a Flower run (the handshake, which every node gets before round 1 or when it joins) the node
drops the versions written after the start (a fresh run: all of them, from an older run in the same directory; a
resumed run: the rounds it replays, as the simulation's ``on_start``), and after each round it prunes versions no
kept checkpoint needs. After the last round the server asks every node for its personal evaluation
(``query.fedlm_personal_eval``, with the final global adapter): the node writes ``adapter/``, ``personal.json`` and the
profile into the client's folder and answers the ``personal`` records of
:func:`~fedlm.personalization.setup.evaluate_personal` (its global, personal and mixed models on its own share and
on the others' shares).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, RecordDict

from fedlm.aggregation.lora_structure import pad_like
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientUpdate
from fedlm.models.adapters import load_trainable_state
from fedlm.personalization.base import ClientSide, PersonalMethod, build_method
from fedlm.personalization.runtime import train_personal
from fedlm.personalization.setup import evaluate_personal, write_personal
from fedlm.personalization.store import ClientStore
from fedlm.runtime.flower.messages import config_hash, meta, unpack_tensors
from fedlm.runtime.flower.personal_server import PERSONAL_META
from fedlm.runtime.flower.state_dir import node_state_root

_SYNCED = "fedlm_personal"  # context.state record: this Flower run's rollback is done on this node


def node_store(config: ExperimentConfig, node_config: Mapping[str, Any]) -> ClientStore:
    """The store of the node's client under its state directory (``fedlm-state-dir``); refuses a node without one."""
    root = node_state_root(str(config.personalization.method), node_config)
    return ClientStore(root / config_hash(config)[:12] / "clients")


def node_method(session: Any, store: ClientStore) -> PersonalMethod:
    """The configured method on the node's session (a trainer without DP-SGD, as the simulation's personal side)."""
    side = ClientSide(session.config, session.trainer(private=False), session.data.client_train, store)
    return build_method(session.config, side)


def sync_once(context: Context, store: ClientStore, start: int) -> None:
    """At the node's first message of a Flower run (the handshake, else its first train or evaluation message):
    drop the versions written after round ``start`` (a fresh run: all; a resumed one: those it replays)."""
    if _SYNCED not in context.state.config_records:
        store.rollback(start)
        context.state[_SYNCED] = ConfigRecord({"start": start})


def sync_on_hello(server: Mapping[str, Any], context: Context) -> None:
    """The handshake's part of :func:`sync_once` (the server's ``personal`` metadata; without it, nothing)."""
    from fedlm.runtime.flower.client_app import node_config_of  # noqa: PLC0415 - it imports this module

    sync = server.get(PERSONAL_META)
    if sync is not None:
        config = node_config_of(context.node_config, context.run_config)
        sync_once(context, node_store(config, context.node_config), int(sync["start"]))


def personal_round(
    content: RecordDict, context: Context, session: Any, client: str, task: ClientTask, train: Callable[[ClientTask], ClientUpdate]
) -> ClientUpdate:
    """The node's round with the personal method around ``train``; the store rolled back once per Flower run (to the
    round the server started from) and pruned to the server's kept checkpoints after."""
    store = node_store(session.config, context.node_config)
    sync = meta(content).get(PERSONAL_META) or {}
    sync_once(context, store, int(sync.get("start", task.plan.round - 1)))
    method = node_method(session, store)
    (update,) = train_personal(method, client, task, lambda sent: [train(sent)])
    store.prune([int(r) for r in sync.get("checkpoints", [])])
    if not isinstance(update, ClientUpdate):  # train() raises on failure; it never answers a ClientFailure
        raise FedlmError(f"client {client}: personal training gave no update")
    return update


def evaluate_on_node(content: RecordDict, context: Context) -> tuple[list[dict[str, Any]], Path]:
    """Write the node's client's personal adapter, ``personal.json`` and profile in its folder and evaluate it
    (global / personal / mixes, own and others' shares); returns the records and the folder."""
    from fedlm.runtime.flower.client_app import client_names, client_of, node_config_of  # noqa: PLC0415 - it imports this module
    from fedlm.runtime.flower.node_train import node_session  # noqa: PLC0415 - it imports this module

    config = node_config_of(context.node_config, context.run_config)
    client = client_of(context.node_config.get("partition-id"), client_names(config))
    m = meta(content)
    if m["config_hash"] != config_hash(config):
        raise FedlmError("the node's config differs from the server's (config hash); restart the node with the server's config")
    if m["client_id"] != client:
        raise FedlmError(f"this node serves client {client}, not {m['client_id']}")
    session = node_session(config, client)
    rounds = int(m["round"])  # the server's (a node's federation.rounds may differ)
    config = config.model_copy(update={"federation": config.federation.model_copy(update={"rounds": rounds})})
    session = dataclasses.replace(session, config=config)
    state = pad_like(unpack_tensors(content.array_records["state"]), session.initial_state)
    store = node_store(config, context.node_config)
    sync_once(context, store, int((m.get(PERSONAL_META) or {}).get("start", rounds)))
    method = node_method(session, store)
    personal = {client: write_personal(session, method, client, state)}
    load_trainable_state(session.model, state)
    records = evaluate_personal(session, method, state, personal) if config.personalization.evaluate else []
    return records, store.client_dir(client)
