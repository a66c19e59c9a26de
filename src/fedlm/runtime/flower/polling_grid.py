"""The ServerApp's ``Grid`` with a shorter wait between asking the SuperLink for replies.

Flower 1.41's deployment grid (``flwr.superlink.grid.http_grid``) pushes the messages and then pulls the replies
every 3 s, so every exchange (a round's train messages, each SecAgg+ stage, the handshake) ends up to 3 s after the
last reply arrived. :class:`PollingGrid` wraps that grid and does the same with Flower's own ``push_messages`` and
``pull_messages`` every ``poll_s`` (0.2 s); everything else is the wrapped grid's. :func:`polling` wraps only that
grid (other grids, e.g. Flower's in-memory simulation grid or the tests', keep their own ``send_and_receive``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid import HttpGrid


class PollingGrid(Grid):
    """``grid`` whose :meth:`send_and_receive` polls for replies every ``poll_s`` seconds."""

    def __init__(self, grid: Grid, poll_s: float = 0.2) -> None:
        self.inner = grid
        self.poll_s = poll_s

    def set_run(self, run: Run) -> None:  # noqa: D102 - the wrapped grid's
        self.inner.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:  # noqa: D102
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all are in or ``timeout`` seconds passed (Flower's
        semantics: ``None`` waits without limit)."""
        waiting = set(self.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting:
                break
            time.sleep(self.poll_s)
        return replies


def polling(grid: Grid, poll_s: float = 0.2) -> Grid:
    """``grid`` in a :class:`PollingGrid` if it is Flower's deployment (HTTP) grid, else ``grid`` itself."""
    return PollingGrid(grid, poll_s) if isinstance(grid, HttpGrid) else grid
