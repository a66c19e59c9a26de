"""What a client downloads under a broadcast downlink (``compression.downlink``, FedKSeed's seed lists): the
messages of the rounds since the replica it holds, or the dense model when that is smaller.

The server counts, for every task, the smaller of the two (:func:`sync_tasks`). In the simulation every client's
replica is the server's own computation, so only the count matters. Clients on other machines (Flower SuperNodes)
keep their replica themselves; there the task carries what travels (:class:`~fedlm.core.task.ReplicaSync`): the
messages (which the server then keeps, :attr:`DownlinkState.keep_messages`) or the dense model, and the digest of
the state they must rebuild. A node that cannot rebuild it (restarted, or a new Flower run after the server
resumed) refuses the task, and from then on the server sends that client the dense model until it holds a replica
again (:func:`forget_failed`, :func:`forget_on_start`). A message the server no longer keeps (a resumed server,
or older than what the dense model would cost) likewise means the dense model.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from fedlm.aggregation.lora_structure import wire_form
from fedlm.core.round import RoundRecord
from fedlm.core.task import ClientTask, ReplicaSync
from fedlm.core.update import TensorDict
from fedlm.federation.wire import serialized_bytes

if TYPE_CHECKING:
    from fedlm.compression.downlink import DownlinkState

UNKNOWN = -1  # a client whose replica the server does not know: it gets the dense model
ReplicaStep = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], TensorDict]  # (R_{t-1}, m_t) -> R_t


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in sorted-name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sync_tasks(tasks: dict[str, ClientTask], down: DownlinkState, kind: str, through: int, sent: dict[tuple[int, str], int]) -> dict[str, ClientTask]:
    """Count each task's download in ``sent`` (the missed messages or the dense model, the smaller) and mark each
    client as holding the replica of round ``through``; with ``down.keep_messages``, put in each task what travels."""
    if not tasks:
        return tasks
    full = next(iter(tasks.values())).state
    digest = state_digest(full) if down.keep_messages else ""
    out: dict[str, ClientTask] = {}
    for client, task in tasks.items():
        size, since = _download(down, client, task, through)
        sent[(task.plan.round, client)] = size
        down.synced[client] = through
        if not down.keep_messages:
            out[client] = task
            continue
        messages = {r: down.messages[r] for r in sorted(down.message_bytes) if since is not None and since < r <= through}
        out[client] = dataclasses.replace(task, replica=ReplicaSync(kind, through, digest, since, messages))
    if down.keep_messages:
        _prune(down, serialized_bytes(full))
    return out


def _download(down: DownlinkState, client: str, task: ClientTask, through: int) -> tuple[int, int | None]:
    """(bytes, the replica round the messages start from; None: the dense model)."""
    extras = wire_form(task.context.extras, task.plan.rank)
    dense = serialized_bytes(wire_form(task.state, task.plan.rank), extras)
    held = down.synced.get(client, 0)
    rounds = [r for r in down.message_bytes if held < r <= through]
    if held == UNKNOWN or (down.keep_messages and any(r not in down.messages for r in rounds)):
        return dense, None
    lists = sum(down.message_bytes[r] for r in rounds) + (serialized_bytes(extras) if extras else 0)
    return (lists, held) if lists < dense else (dense, None)


def _prune(down: DownlinkState, dense: int) -> None:
    """Drop the oldest kept messages while the kept ones together outweigh the dense model: a client that needs more
    than the newest of them is sent the dense model anyway (it is smaller), so the server keeps at most about one
    dense model's worth of messages, however many rounds and clients."""
    for r in sorted(down.messages):
        if sum(down.message_bytes[k] for k in down.messages) <= dense:
            break
        del down.messages[r]


def forget_on_start(down: DownlinkState | None) -> None:
    """A server process that starts (fresh or resumed) over nodes: the nodes' replicas of an earlier process are not
    known to be there (a Flower run keeps a node's state only within itself), except the initial adapter."""
    if down is not None and down.keep_messages:
        down.synced = {client: (0 if r == 0 else UNKNOWN) for client, r in down.synced.items()}


def forget_failed(down: DownlinkState | None, record: RoundRecord) -> None:
    """A client that failed this round may not hold the replica it was sent (its node died, or refused a catch-up it
    could not rebuild): it gets the dense model next."""
    if down is not None and down.keep_messages:
        for failure in record.failures:
            down.synced[failure.client_id] = UNKNOWN


def rebuilt_state(sync: ReplicaSync, base: Mapping[str, torch.Tensor], advance: ReplicaStep) -> TensorDict:
    """The replica of round ``sync.through`` from ``base`` (the replica of round ``sync.since``) and the messages."""
    state = dict(base)
    for round_num in sorted(sync.messages):
        state = advance(state, sync.messages[round_num])
    return state
