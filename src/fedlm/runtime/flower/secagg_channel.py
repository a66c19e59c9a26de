"""The Flower channel of a SecAgg+ round: each stage's protocol messages as Flower messages to the round's SuperNodes,
each reply checked before the protocol uses it (:mod:`~fedlm.runtime.flower.secagg_envelope`).

A node that does not answer a stage (it died, its message expired, it timed out), answers with an error, or sends a
reply that is replayed, misrouted or malformed has dropped out of the round from that stage on: it gets no further
message, and the server's protocol recovers from it as from any dropout (Bonawitz et al. 2017, Sec. 4). Each
exclusion is kept with its reason (``excluded``) and logged in ``metrics.jsonl``. The bytes counted are those of the
protocol messages as Flower serialises them (the round's task, sent with the masked-input stage, is counted by the
traffic meter as for any round). ``FEDLM_SECAGG_DUMP=DIR`` (tests, audits) saves every reply the server received.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode

from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.federation.validation import Expectations, update_problem
from fedlm.privacy.secagg import wire
from fedlm.runtime.flower import secagg_envelope as envelope
from fedlm.runtime.flower.messages import META, task_content
from fedlm.runtime.flower.runtime import FlowerRuntime

DUMP_ENV = "FEDLM_SECAGG_DUMP"
TAMPERED = 4103  # a node's error code for a share that failed authentication (fedlm.runtime.flower.secagg_node)
_NODE_GONE = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}


class TamperReported(Exception):
    """A node found a share that fails authentication: the round aborts, as in the simulation."""


@dataclass
class FlowerChannel:
    """One round's SecAgg+ messages between the server and the SuperNodes of the round's clients."""

    runtime: FlowerRuntime
    round_num: int
    length: int
    tasks: Mapping[str, ClientTask]
    nodes: dict[int, int]  # client index -> node id, for the clients still in the protocol
    clients: dict[int, str]  # client index -> client name
    up: dict[str, int] = field(default_factory=dict)
    down: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)  # client -> why it left the protocol
    results: dict[str, ClientUpdate | ClientFailure] = field(default_factory=dict)
    seconds: float = 0.0  # waiting for the nodes

    def exchange(self, stage: str, outbox: Mapping[int, RecordDict]) -> dict[int, RecordDict]:
        """Send ``stage`` to the nodes still in the protocol; the valid replies by client index."""
        messages, sent = [], {}
        kind = f"{'train' if stage == 'masked_input' else 'query'}.{envelope.SECAGG_ACTION}"
        for index, proto in outbox.items():
            node, client = self.nodes.get(index), self.clients[index]
            if node is None:
                continue
            protocol_bytes = len(wire.to_bytes(envelope.wrap(proto, self.round_num, stage, index, client)))
            self.down[client] = self.down.get(client, 0) + protocol_bytes  # the task is the traffic meter's
            task = task_content(client, self.tasks[client], self.runtime.config, self.runtime.task_meta) if stage == "masked_input" else None
            content = envelope.wrap(proto, self.round_num, stage, index, client, task)
            messages.append(Message(content, dst_node_id=node, message_type=kind))
            sent[node] = index
        tick = time.monotonic()
        replies = list(self.runtime.grid.send_and_receive(messages, timeout=self.runtime.round_timeout_s)) if messages else []
        self.seconds += time.monotonic() - tick
        valid: dict[int, RecordDict] = {}
        for reply in replies:
            if reply.metadata.src_node_id in sent:
                self._take(stage, sent.pop(reply.metadata.src_node_id), reply, valid)
        for node, index in sent.items():
            self.leave(
                index,
                stage,
                f"node {node} did not reply to {stage} within {self.runtime.round_timeout_s:g}s (it died or lost its connection)",
                unreachable=True,
            )
        return valid

    def _take(self, stage: str, index: int, reply: Message, valid: dict[int, RecordDict]) -> None:
        client = self.clients[index]
        if reply.has_error():
            code, reason = reply.error.code, reply.error.reason
            if code == TAMPERED:
                raise TamperReported(f"secure aggregation aborted: client {client} at {stage}: {reason}")
            self.leave(index, stage, f"node failed at {stage}: {reason}", unreachable=code in _NODE_GONE)
            return
        self.up[client] = self.up.get(client, 0) + len(wire.to_bytes(reply.content))
        _dump(reply.content, self.round_num, stage, client)
        problem = envelope.reply_problem(reply.content, self.round_num, stage, index, self.length)
        if problem is None and stage == "masked_input":
            problem = self._masked_update(client, reply.content)
        if problem is not None:
            self.leave(index, stage, f"excluded from secure aggregation at {stage}: {problem}", unreachable=False)
            return
        valid[index] = envelope.protocol(reply.content)

    def _masked_update(self, client: str, content: RecordDict) -> str | None:
        """Record the metrics-only update of a masked input; why it cannot count, or None."""
        try:
            m = json.loads(str(content.config_records[META]["json"]))
            update = ClientUpdate(str(m["client_id"]), int(m["round"]), int(m["num_examples"]), {}, {k: float(v) for k, v in m["metrics"].items()})
        except (KeyError, TypeError, ValueError) as exc:
            return f"malformed metrics ({type(exc).__name__}: {exc})"
        expect = Expectations(self.round_num, {}, [client], None, self.runtime.config.federation.max_num_examples)
        problem = update_problem(update, expect)
        if problem is None:
            self.results[client] = update
        return problem

    def leave(self, index: int, stage: str, reason: str, unreachable: bool) -> None:
        """Client ``index`` is out of the protocol from ``stage`` on (a failure if it had not sent its masked input)."""
        client, node = self.clients[index], self.nodes.pop(index, None)
        self.excluded[client] = reason
        if client not in self.results:
            self.results[client] = ClientFailure(client, self.round_num, reason, unreachable=unreachable)
        self.runtime.log.append(
            {"round": self.round_num, "split": "secagg", "event": "excluded", "client": client, "node": str(node), "stage": stage, "reason": reason}
        )
        if unreachable and node is not None:
            self.runtime._forget(client, node)  # noqa: SLF001 - the runtime's own bookkeeping of nodes that left


def _dump(content: RecordDict, round_num: int, stage: str, client: str) -> None:
    """Save a received reply under ``$FEDLM_SECAGG_DUMP`` (its serialised bytes and every array in it)."""
    directory = os.environ.get(DUMP_ENV)
    if not directory:
        return
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    stem = f"r{round_num}-{stage}-{client}"
    (root / f"{stem}.bin").write_bytes(wire.to_bytes(content))
    for record_name, record in content.array_records.items():
        for key, array in record.items():
            np.save(root / f"{stem}-{record_name}-{key}.npy", array.numpy())
