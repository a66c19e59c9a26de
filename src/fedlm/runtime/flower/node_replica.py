"""A SuperNode's replica of the global model under a broadcast downlink (``compression.downlink``, FedKSeed's seed
lists): kept in Flower's per-node ``context.state`` between rounds, advanced by the messages the server sends, and
checked against the server's digest before the node trains from it (:mod:`fedlm.compression.catch_up`).

A node that cannot rebuild the server's replica (it has none of that round: restarted, or a new Flower run after
the server resumed; or the result differs from the digest) refuses the task naming why; the server then sends it
the dense model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, Context

from fedlm.compression.catch_up import ReplicaStep, rebuilt_state, state_digest
from fedlm.compression.codec import Codec, MalformedMessage
from fedlm.compression.downlink import apply_message
from fedlm.compression.fedkseed import COEFFICIENT, SEED_INDEX, candidate_seeds, seedwise_step
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.core.task import ClientTask, ReplicaSync
from fedlm.core.update import TensorDict
from fedlm.runtime.flower.messages import pack_tensors, unpack_tensors

REPLICA, REPLICA_ROUND = "fedlm_replica", "fedlm_replica_round"


def replica_step(kind: str, config: ExperimentConfig) -> ReplicaStep:
    """How one message advances a replica: the downlink codec's decode-and-add, or FedKSeed's seed-wise step."""
    if kind == "codec" and config.compression.downlink is not None:
        codec = Codec.from_config(config.compression.downlink)
        return lambda replica, message: apply_message(codec, replica, message)
    if kind == "seeds":
        seeds = candidate_seeds(config.seed, config.federation.fedkseed.seeds)

        def seed_step(replica: Mapping[str, torch.Tensor], message: Mapping[str, torch.Tensor]) -> TensorDict:
            indices = [int(i) for i in message[SEED_INDEX]]
            if indices and not 0 <= min(indices) <= max(indices) < len(seeds):
                raise FedlmError(f"a seed list names a seed outside the pool of {len(seeds)}")
            return seedwise_step(replica, seeds, indices, [float(c) for c in message[COEFFICIENT]])

        return seed_step
    raise FedlmError(f"the server sent a {kind!r} downlink, which this node's config does not have; restart it with the server's config")


def synced_task(task: ClientTask, context: Context, config: ExperimentConfig, initial: Mapping[str, torch.Tensor]) -> ClientTask:
    """``task`` with the state the server's replica holds (rebuilt from this node's replica when the messages came
    instead of the state), after checking its digest; the node keeps it as its replica of ``task.replica.through``."""
    sync = task.replica
    if sync is None:
        return task
    held = _held_round(context)
    kept = unpack_tensors(context.state.array_records[REPLICA]) if held is not None else {}
    if sync.since is None:
        state = dict(task.state)
    elif held == sync.through and state_digest(kept) == sync.digest:  # a retried task: already rebuilt
        state = kept
    elif sync.since == 0:
        state = _rebuilt(sync, initial, config)
    elif held == sync.since:
        state = _rebuilt(sync, kept, config)
    else:
        have = "no replica" if held is None else f"the replica of round {held}"
        raise FedlmError(f"this node holds {have}, not the replica of round {sync.since} that the server's downlink messages start from")
    if state_digest(state) != sync.digest:
        raise FedlmError(
            f"the node's rebuilt replica of round {sync.through} differs from the server's (digest); the server sends the dense model next"
        )
    context.state[REPLICA] = pack_tensors(state)
    context.state[REPLICA_ROUND] = ConfigRecord({"round": sync.through})
    return dataclasses.replace(task, state=state)


def _held_round(context: Context) -> int | None:
    """The round of the replica this node keeps, or None."""
    if REPLICA_ROUND not in context.state.config_records:
        return None
    value = context.state.config_records[REPLICA_ROUND]["round"]
    return value if isinstance(value, int) else None


def _rebuilt(sync: ReplicaSync, base: Mapping[str, torch.Tensor], config: ExperimentConfig) -> TensorDict:
    try:
        return rebuilt_state(sync, base, replica_step(sync.kind, config))
    except (MalformedMessage, KeyError, ValueError, RuntimeError) as exc:
        raise FedlmError(f"a downlink message from the server cannot be applied: {exc}") from exc
