"""The Flower runtime: the server loop's ``train_clients`` as Flower messages over a ``Grid``.

Every SuperNode serves one client (its ``partition-id``). New nodes get a handshake (:data:`HELLO`) carrying the
server's config hash; a node whose config differs, or whose partition is outside the federation, answers with an
error naming the difference and is refused (logged in ``metrics.jsonl`` as a ``split: "flower"`` record). A train
message that gets no reply within ``round_timeout_s`` (the node died or hangs) or an error reply becomes a
:class:`ClientFailure` naming the client, and the server loop's ``federation.min_clients`` rule decides the round
(retried with ``federation.round_retries``, else skipped). A node that did not reply is forgotten: a SuperNode
restarted for the same client (a new node id) is greeted at the next round or retry and serves it from then on.

Waiting for the nodes and greeting them is the run's start, not round 1's work: :class:`NodeConnection` (the
runtime's ``connection`` capability, a round observer) does it before the first round, after the other observers'
start (personalization puts its start round into the handshake), and logs how long it took (``event: "connected"``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedlm.config.schema import ExperimentConfig
from fedlm.core.round import RoundObserver
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate, TensorDict
from fedlm.privacy.secagg.round import SecureAggregation
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole
from fedlm.runtime.flower.messages import HELLO, TRAIN, hello_content, meta, task_content, update_from_content

# Flower's error replies that mean the message never reached a live ClientApp (not a failed training): the node is
# unavailable or the message or its reply expired; and a ClientApp process that crashed (e.g. out of memory).
_NODE_GONE = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}
_UNREACHABLE = _NODE_GONE | {ErrorCode.CLIENT_APP_CRASHED}
# On the simulation engine a ClientApp runs in a Ray worker; a worker that died (killed, out of memory) comes back as
# an error reply naming Ray's actor error, the engine's counterpart of a crashed ClientApp process.
_RAY_WORKER_DIED = ("ray.exceptions.ActorDiedError", "ray.exceptions.ActorUnavailableError", "ray.exceptions.RayActorError")


def worker_died(reason: str | None) -> bool:
    """Whether an error reply's ``reason`` says the Ray worker running the ClientApp died (simulation engine)."""
    return reason is not None and any(name in reason for name in _RAY_WORKER_DIED)


@dataclass
class FlowerRuntime:
    """Sends each round's tasks to the SuperNodes that serve the chosen clients and collects their updates."""

    grid: Grid
    config: ExperimentConfig
    client_names: list[str]
    like: Mapping[str, torch.Tensor]  # the global adapter state: full-rank shapes for the replies
    log: MetricsLog
    console: RunConsole
    round_timeout_s: float = 600.0
    hello_timeout_s: float = 120.0
    min_nodes: int = 1  # wait for this many clients to have a node before the first round
    wait_for_nodes_s: float = 120.0
    nodes: dict[str, int] = field(default_factory=dict)  # client name -> node id
    refused: dict[int, str] = field(default_factory=dict)  # node id -> why it was refused
    gone: set[int] = field(default_factory=set)  # nodes that did not reply to a train message (never greeted again)
    standby: set[int] = field(default_factory=set)  # nodes for a client another node serves (e.g. a restarted node)
    task_meta: dict[str, Any] = field(default_factory=dict)  # added to every train message (e.g. personalization's sync)

    def connect(self, min_nodes: int, wait_s: float, round_num: int = 0) -> None:
        """Wait up to ``wait_s`` seconds until ``min_nodes`` nodes serve clients (fewer: go on with those)."""
        started = time.monotonic()
        deadline = started + wait_s
        while True:
            self.discover(round_num)
            if len(self.nodes) >= min_nodes or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        served = ", ".join(f"{c}: node {n}" for c, n in sorted(self.nodes.items()))
        seconds = time.monotonic() - started
        self.console.print(f"flower: {len(self.nodes)} of {len(self.client_names)} clients have a SuperNode ({served}), {seconds:.1f}s")
        self.log.append({"round": round_num, "split": "flower", "event": "connected", "nodes": len(self.nodes), "seconds": seconds})

    def connection(self) -> RoundObserver:
        """Capability asked when the loop is built: the observer that connects to the nodes before the first round."""
        return NodeConnection(self)

    def discover(self, round_num: int = 0) -> None:
        """Handshake with every connected node not yet known; forget nodes that left."""
        connected = set(self.grid.get_node_ids())
        self.nodes = {c: n for c, n in self.nodes.items() if n in connected}
        new = [n for n in connected if n not in self.nodes.values() and n not in self.refused and n not in self.gone]
        if not new:
            return
        messages = [Message(hello_content(self.config, self.task_meta), dst_node_id=n, message_type=HELLO) for n in new]
        for reply in self.grid.send_and_receive(messages, timeout=self.hello_timeout_s):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._refuse(node, reply.error.reason or f"error code {reply.error.code}", round_num)
                continue
            info = meta(reply.content)
            client = info["client_id"]
            if client in self.nodes and self.nodes[client] != node:  # greeted again later: it takes over if the other leaves
                if node not in self.standby:
                    self.standby.add(node)
                    self.console.print(f"[yellow]flower: node {node} also serves client {client} (node {self.nodes[client]}); on standby[/yellow]")
                    self.log.append({"round": round_num, "split": "flower", "event": "standby", "node": str(node), "client": client})
                continue
            self.standby.discard(node)
            self.nodes[client] = node
            self.log.append({"round": round_num, "split": "flower", "event": "joined", "node": str(node), "client": client})

    def _refuse(self, node: int, reason: str, round_num: int) -> None:
        self.refused[node] = reason
        self.console.print(f"[red]flower: node {node} refused: {reason}[/red]")
        self.log.append({"round": round_num, "split": "flower", "event": "refused", "node": str(node), "reason": reason})

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> list[ClientUpdate | ClientFailure]:
        """One train message per task; missing or failed replies become failures naming the client."""
        round_num = next(iter(tasks.values())).plan.round if tasks else 0
        if not self.nodes and not self.refused:  # nobody connected before the run started (or every node left)
            self.connect(self.min_nodes, self.wait_for_nodes_s, round_num)
        self.discover(round_num)
        results: list[ClientUpdate | ClientFailure] = []
        sent: dict[int, str] = {}
        messages = []
        for client, task in tasks.items():
            message = self.train_message(client, task)
            if message is None:
                results.append(ClientFailure(client, round_num, f"no SuperNode serves client {client}", unreachable=True))
                continue
            sent[message.metadata.dst_node_id] = client
            messages.append(message)
        started = time.monotonic()
        replies = list(self.grid.send_and_receive(messages, timeout=self.round_timeout_s)) if messages else []
        waited = time.monotonic() - started
        answered: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in sent:
                continue
            answered.add(node)
            results.append(self.result_of(reply, sent[node], round_num))
        for node, client in sent.items():
            if node not in answered:
                results.append(self.no_reply(client, node, round_num, timed_out=waited >= self.round_timeout_s))
        order = {client: i for i, client in enumerate(tasks)}  # the simulation's order: float sums do not commute
        return sorted(results, key=lambda r: order[r.client_id])

    def train_message(self, client: str, task: ClientTask) -> Message | None:
        """The train message of ``task`` to the node serving ``client`` (None: no node serves it)."""
        node = self.nodes.get(client)
        if node is None:
            return None
        return Message(task_content(client, task, self.config, self.task_meta), dst_node_id=node, message_type=TRAIN)

    def result_of(self, reply: Message, client: str, round_num: int) -> ClientUpdate | ClientFailure:
        """``client``'s update from its node's reply, or the failure it reports (a node gone is forgotten)."""
        node = reply.metadata.src_node_id
        if not reply.has_error():
            return update_from_content(reply.content, self.like)
        code = reply.error.code
        unreachable = code in _UNREACHABLE or worker_died(reply.error.reason)
        if code in _NODE_GONE:
            self._forget(client, node)
        return ClientFailure(client, round_num, f"node {node} failed: {reply.error.reason}", unreachable=unreachable)

    def no_reply(self, client: str, node: int, round_num: int, timed_out: bool) -> ClientFailure:
        """The failure of a train message without a reply; the node is forgotten."""
        why = (
            f"did not reply within {self.round_timeout_s:g}s" if timed_out else "left the federation (no reply; the node died or lost its connection)"
        )
        self._forget(client, node)
        return ClientFailure(client, round_num, f"client {client} (node {node}) {why}", unreachable=True)

    def asynchronous(self) -> Any:
        """Capability asked by FedBuff's loop (``systems.mode: fedbuff``): train messages sent one client at a time and
        replies taken as they arrive (:class:`~fedlm.runtime.flower.dispatch.FlowerDispatch`)."""
        from fedlm.runtime.flower.dispatch import FlowerDispatch  # noqa: PLC0415 - it imports this module

        return FlowerDispatch(self)

    def masked_secure_aggregation(self, secure: SecureAggregation, space: Mapping[str, torch.Tensor]) -> tuple[Any, Any]:
        """Capability asked by the server loop under ``privacy.secure_aggregation``: the runtime that trains and masks
        on the nodes (SecAgg+ rounds 0-3) and the aggregation side of the protocol (round 4), sharing one round."""
        from fedlm.runtime.flower.secagg_server import FlowerSecureAggregation, SecureFlowerRuntime  # noqa: PLC0415 - it imports this module

        masked = SecureFlowerRuntime(self, secure, space)
        return masked, FlowerSecureAggregation(masked, secure)

    def node_personalization(self, checkpoints: Path) -> RoundObserver:
        """Capability asked by the loop under ``personalization.method``: the clients' personal state lives on their
        nodes; the observer tells them the run's start and kept checkpoints (:mod:`fedlm.runtime.flower.personal_server`)."""
        from fedlm.runtime.flower.personal_server import NodeStoreSync  # noqa: PLC0415 - it imports this module

        return NodeStoreSync(self, checkpoints)

    def personal_on_nodes(self, state: TensorDict) -> list[dict[str, Any]]:
        """Capability asked after the last round: each node writes its client's personal adapter and answers its
        personal evaluation's records."""
        from fedlm.runtime.flower.personal_server import personal_on_nodes  # noqa: PLC0415 - it imports this module

        return personal_on_nodes(self, state)

    def _forget(self, client: str, node: int) -> None:
        """``node`` left: never greet it again; a new node may serve ``client``."""
        self.gone.add(node)
        if self.nodes.get(client) == node:
            del self.nodes[client]

    def summary(self) -> dict[str, Any]:
        """Which node serves which client, and which nodes were refused."""
        return {"nodes": {c: str(n) for c, n in self.nodes.items()}, "refused": {str(n): r for n, r in self.refused.items()}}


@dataclass
class NodeConnection(RoundObserver):
    """Waits for the runtime's nodes and greets them before the first round of this process, so round 1 times only
    its own messages (as every later round); the wait and the handshake are logged as the run's start."""

    runtime: FlowerRuntime

    def on_start(self, state: TensorDict, start_round: int) -> None:
        if not self.runtime.nodes and not self.runtime.refused:
            self.runtime.connect(self.runtime.min_nodes, self.runtime.wait_for_nodes_s, start_round)
