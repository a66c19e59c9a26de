"""fedlm's tasks and updates as Flower records: only adapter tensors (cut to the client's rank) and scalars travel.

A message is a ``RecordDict`` of a ``ConfigRecord`` ``"meta"`` (one JSON string: plan, client, config hash, metrics)
and one ``ArrayRecord`` per tensor group, each holding the group as one safetensors blob (a uint8 ``Array``), so
every dtype (bfloat16 included) arrives bit for bit and Flower may chunk large groups.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from safetensors.torch import load, save

from fedlm.aggregation.lora_structure import pad_like, wire_form
from fedlm.config.io import config_to_dict, flatten_keys
from fedlm.config.schema import ExperimentConfig
from fedlm.core.task import ClientContext, ClientTask, LocalPlan, ReplicaSync
from fedlm.core.update import ClientUpdate, TensorDict

HELLO, TRAIN = "query.fedlm_hello", "train"  # message types: node -> client name handshake; one round's training
PERSONAL_EVAL = "query.fedlm_personal_eval"  # after the last round: the final global adapter -> the node's personal records
META = "meta"
REPLICA_MESSAGE = "replica_round_"  # + round: one downlink message of a node's catch-up (its own safetensors blob)
# Keys that may differ between the server's and a node's config: where outputs go, the server-only evaluation, and
# each machine's own hardware (its device; checkpointing trades memory for compute without changing the math).
_LOCAL_KEYS = (
    "output_dir",
    "eval",
    "federation.rounds",
    "federation.round_retries",
    "federation.retry_wait_s",
    "model.device",
    "model.gradient_checkpointing",
)


# With ``partition.method: node_local`` each node's data paths are its own (the tokenization settings stay shared).
_NODE_DATA_KEYS = ("data.train", "data.test", "data.max_train_examples", "data.test_fraction")


def shared_config(config: ExperimentConfig) -> dict[str, Any]:
    """The flattened config every node must share with the server (all but output paths, eval, rounds and the
    server's retry settings; with ``node_local``, also the data paths)."""
    flat = flatten_keys(config_to_dict(config))
    local = _LOCAL_KEYS + (_NODE_DATA_KEYS if config.partition.method == "node_local" else ())
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in local)}


def config_hash(config: ExperimentConfig) -> str:
    """SHA-256 of :func:`shared_config` (sorted JSON)."""
    return hashlib.sha256(json.dumps(shared_config(config), sort_keys=True, default=str).encode()).hexdigest()


def config_difference(server: Mapping[str, Any], node: Mapping[str, Any]) -> str:
    """The keys where two shared configs differ, with both values: ``peft.r (server 4, node 8)``."""
    keys = sorted(k for k in set(server) | set(node) if server.get(k) != node.get(k))
    return ", ".join(f"{k} (server {server.get(k)!r}, node {node.get(k)!r})" for k in keys)


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """One safetensors blob of ``tensors`` as a uint8 Flower ``Array``."""
    blob = save({n: t.detach().contiguous().cpu() for n, t in tensors.items()}) if tensors else b""
    return ArrayRecord({"safetensors": Array(np.frombuffer(blob, dtype=np.uint8).copy())})


def unpack_tensors(record: ArrayRecord) -> TensorDict:
    """The tensors :func:`pack_tensors` packed."""
    blob = record["safetensors"].numpy().tobytes()
    return dict(load(blob)) if blob else {}


def meta(content: RecordDict) -> dict[str, Any]:
    """The JSON metadata of a message."""
    return json.loads(str(content.config_records[META]["json"]))


def _with_meta(values: dict[str, Any], **arrays: ArrayRecord) -> RecordDict:
    return RecordDict({META: ConfigRecord({"json": json.dumps(values)}), **arrays})


def hello_content(config: ExperimentConfig, extra: Mapping[str, Any] | None = None) -> RecordDict:
    """The handshake the server sends every new node: its config hash and shared config (to name a difference), and
    the runtime's ``extra`` metadata (as on every train message)."""
    return _with_meta({**(extra or {}), "config_hash": config_hash(config), "shared_config": shared_config(config)})


def hello_reply(client_id: str, partition_id: int) -> RecordDict:
    """A node's answer to the handshake: the client it serves."""
    return _with_meta({"client_id": client_id, "partition_id": partition_id})


def task_content(client_id: str, task: ClientTask, config: ExperimentConfig, extra: Mapping[str, Any] | None = None) -> RecordDict:
    """A train message: the plan, the global adapter cut to the client's rank and the algorithm's extras (and the
    runtime's ``extra`` metadata, e.g. what a node's personal store needs to follow the server's checkpoints).

    The client's memory (``task.context.memory``) is not sent: in a deployment it stays on the node."""
    plan, rank = task.plan, task.plan.rank
    values = {
        **(extra or {}),
        "client_id": client_id,
        "config_hash": config_hash(config),
        "round": plan.round,
        "lrs": plan.lrs,
        "batch_size": plan.batch_size,
        "seed": plan.seed,
        "rank": rank,
        "frozen": plan.frozen,
    }
    state = wire_form(task.state, rank)
    arrays = {"extras": pack_tensors(wire_form(task.context.extras, rank))}
    sync = task.replica
    if sync is not None:  # a broadcast downlink: the messages since the node's replica instead of the state
        values["replica"] = {"kind": sync.kind, "through": sync.through, "digest": sync.digest, "since": sync.since}
        if sync.since is not None:
            state = {}
            values["replica"]["rounds"] = sorted(sync.messages)
            arrays.update({f"{REPLICA_MESSAGE}{r}": pack_tensors(sync.messages[r]) for r in sorted(sync.messages)})
    return _with_meta(values, state=pack_tensors(state), **arrays)


def task_from_content(content: RecordDict, memory: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> tuple[str, str, ClientTask]:
    """(client id, config hash, task) of a train message; ``memory`` is the node's own, kept between rounds;
    ``like`` holds the full-rank shapes (the node's own adapter state). Under a broadcast downlink the task's
    :class:`ReplicaSync` says how the node rebuilds the state (empty then) from its replica."""
    m = meta(content)
    plan = LocalPlan(int(m["round"]), [float(x) for x in m["lrs"]], int(m["batch_size"]), int(m["seed"]), m["rank"], m.get("frozen"))
    extras = pad_like(unpack_tensors(content.array_records["extras"]), like)
    context = ClientContext(m["client_id"], plan.round, extras, dict(memory), plan.rank)
    sync = m.get("replica")
    replica = None
    if sync is not None:
        messages = {int(r): unpack_tensors(content.array_records[f"{REPLICA_MESSAGE}{r}"]) for r in sync.get("rounds", [])}
        replica = ReplicaSync(str(sync["kind"]), int(sync["through"]), str(sync["digest"]), sync["since"], messages)
    state = pad_like(unpack_tensors(content.array_records["state"]), like)
    return m["client_id"], m["config_hash"], ClientTask(plan, state, context, replica)


def update_content(update: ClientUpdate, rank: int | None) -> RecordDict:
    """A train reply: the delta and extras (cut to ``rank``), example count and metrics; never the memory."""
    values = {"client_id": update.client_id, "round": update.round, "num_examples": update.num_examples, "metrics": update.metrics}
    return _with_meta(values, tensors=pack_tensors(wire_form(update.tensors, rank)), extras=pack_tensors(wire_form(update.extras, rank)))


def update_from_content(content: RecordDict, like: Mapping[str, torch.Tensor]) -> ClientUpdate:
    """The :class:`ClientUpdate` of a train reply, padded to the shapes of ``like`` (its memory stays on the node)."""
    m = meta(content)
    tensors = pad_like(unpack_tensors(content.array_records["tensors"]), like)
    extras = pad_like(unpack_tensors(content.array_records["extras"]), like)
    return ClientUpdate(m["client_id"], int(m["round"]), int(m["num_examples"]), tensors, {k: float(v) for k, v in m["metrics"].items()}, extras)


def personal_eval_content(
    client_id: str, state: Mapping[str, torch.Tensor], config: ExperimentConfig, extra: Mapping[str, Any] | None = None
) -> RecordDict:
    """The server's request after the last round (``personalization.method``): the final global adapter (full rank),
    the last round and the config hash (and the runtime's ``extra`` metadata, as on every train message)."""
    values = {**(extra or {}), "client_id": client_id, "config_hash": config_hash(config), "round": config.federation.rounds}
    return _with_meta(values, state=pack_tensors(state))


def personal_eval_reply(records: list[dict[str, Any]], folder: str) -> RecordDict:
    """A node's answer: its ``personal`` records and where it keeps the client's personal adapter (on the node)."""
    return _with_meta({"records": records, "folder": folder})
