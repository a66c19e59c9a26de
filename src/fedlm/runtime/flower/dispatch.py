"""Train messages one client at a time, replies as they arrive: what FedBuff's asynchronous loop needs from a
Flower deployment (``systems.mode: fedbuff`` over ``federation.runtime: flower``; :mod:`fedlm.systems.fedbuff`).

:meth:`FlowerDispatch.start` pushes one client's train message to the SuperNode that serves it;
:meth:`FlowerDispatch.arrivals` pulls the replies of every message in flight every ``poll_s`` and returns as soon as
at least one has come back, in the order they came. A message without a reply after the runtime's
``round_timeout_s`` becomes the client's failure (its node is forgotten), as in a synchronous round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.runtime.flower.runtime import FlowerRuntime


@dataclass
class _InFlight:
    client: str
    node: int
    round: int
    sent_at: float


@dataclass
class FlowerDispatch:
    """Single train messages over ``runtime``'s grid and nodes, their replies in arrival order."""

    runtime: FlowerRuntime
    poll_s: float = 0.2
    waiting: dict[str, _InFlight] = field(default_factory=dict)  # message id -> the client's message in flight

    def serving(self) -> set[str]:
        """The clients a node serves now (new nodes greeted first)."""
        self.runtime.discover()
        return set(self.runtime.nodes)

    def start(self, client: str, task: ClientTask) -> ClientFailure | None:
        """Send ``task`` to ``client``'s node; the failure when no node serves it or the message was not taken."""
        message = self.runtime.train_message(client, task)
        round_num = task.plan.round
        if message is None:
            return ClientFailure(client, round_num, f"no SuperNode serves client {client}", unreachable=True)
        ids = [i for i in self.runtime.grid.push_messages([message]) if i]
        if not ids:
            return ClientFailure(client, round_num, f"the SuperLink did not take the train message of client {client}", unreachable=True)
        self.waiting[ids[0]] = _InFlight(client, message.metadata.dst_node_id, round_num, time.monotonic())
        return None

    def arrivals(self) -> list[ClientUpdate | ClientFailure]:
        """Wait until at least one message in flight has its reply (or timed out); those results, in arrival order."""
        results: list[ClientUpdate | ClientFailure] = []
        while self.waiting and not results:
            for reply in self.runtime.grid.pull_messages(list(self.waiting)):
                flight = self.waiting.pop(reply.metadata.reply_to_message_id, None)
                if flight is not None:
                    results.append(self.runtime.result_of(reply, flight.client, flight.round))
            now = time.monotonic()
            for message_id, flight in list(self.waiting.items()):
                if now - flight.sent_at > self.runtime.round_timeout_s:
                    del self.waiting[message_id]
                    results.append(self.runtime.no_reply(flight.client, flight.node, flight.round, timed_out=True))
            if not results:
                time.sleep(self.poll_s)
        return results
