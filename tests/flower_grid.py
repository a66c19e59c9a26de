"""A Flower ``Grid`` in this process: each message goes through Flower's serialisation to a ClientApp called with its
node's own ``Context`` (kept between messages, as a SuperNode keeps it), and the reply comes back the same way.
``faults`` alter what a node answers (no reply, a malformed or replayed reply) to test the server's side."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedlm.privacy.secagg import wire
from fedlm.runtime.flower.secagg_envelope import HEAD, head

#: (round, stage, client index, reply content) -> the content the server gets, or None for no reply.
Fault = Callable[[int, str, int, RecordDict], RecordDict | None]


@dataclass
class InMemoryGrid(Grid):
    """Nodes ``1..n`` (node id -> node config) answering with ``app``; ``received`` holds every reply's content."""

    app: ClientApp
    node_configs: dict[int, dict]
    run_config: dict
    faults: dict[int, Fault] = field(default_factory=dict)  # node id -> fault
    received: list[tuple[int, RecordDict]] = field(default_factory=list)
    sent: list[tuple[int, RecordDict]] = field(default_factory=list)  # every message the server sent (node, content)
    latency: dict[int, int] = field(default_factory=dict)  # node id -> pulls before a pushed message's reply is ready
    contexts: dict[int, Context] = field(init=False)
    pending: dict[str, tuple[Message, int]] = field(default_factory=dict)  # pushed message id -> (message, pulls left)

    def __post_init__(self) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.contexts = {n: Context(1, n, cfg, RecordDict(), self.run_config) for n, cfg in self.node_configs.items()}

    def set_run(self, run_id: int) -> None:  # noqa: D102
        pass

    @property
    def run(self):  # noqa: D102, ANN201
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:  # noqa: D102
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue each message (its id set as Flower's grid does); its node answers after ``latency`` pulls."""
        ids = []
        for msg in messages:
            message_id = f"m{len(self.sent) + len(self.pending) + 1}"
            msg.metadata.__dict__["_message_id"] = message_id
            self.pending[message_id] = (msg, self.latency.get(msg.metadata.dst_node_id, 0))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that are ready, in the order asked; each other pending message is one pull closer."""
        replies: list[Message] = []
        for message_id in list(message_ids):
            if message_id not in self.pending:
                continue
            msg, left = self.pending[message_id]
            if left > 0:
                self.pending[message_id] = (msg, left - 1)
                continue
            del self.pending[message_id]
            replies.extend(self.send_and_receive([msg]))
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Every message handled by its node's ClientApp, in order; faults applied to the replies."""
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            delivered = Message(metadata=msg.metadata, content=wire.from_bytes(wire.to_bytes(msg.content)))
            self.sent.append((node, delivered.content))
            reply = self.app(delivered, self.contexts[node])
            if not reply.has_error() and node in self.faults and HEAD in reply.content.config_records:
                round_num, stage, index, _ = head(reply.content)
                content = self.faults[node](round_num, stage, index, reply.content)
                if content is None:
                    continue
                reply = Message(content, reply_to=delivered)
            if not reply.has_error():
                reply = Message(wire.from_bytes(wire.to_bytes(reply.content)), reply_to=delivered)
                self.received.append((node, reply.content))
            replies.append(reply)
        return replies
