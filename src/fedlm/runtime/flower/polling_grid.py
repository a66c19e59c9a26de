"""The ServerApp's ``Grid`` with a shorter wait between asking the SuperLink for replies.

Flower 1.41's deployment grid (``flwr.superlink.grid.http_grid``) pushes the messages and then pulls the replies
every 3 s, so every exchange (a round's train messages, each SecAgg+ stage, the handshake) ends up to 3 s after the
last reply arrived. :class:`PollingGrid` wraps that grid and does the same with Flower's own ``push_messages`` and
``pull_messages`` every ``poll_s`` (0.2 s); everything else is the wrapped grid's. :func:`polling` wraps only that
grid (other grids, e.g. Flower's in-memory simulation grid or the tests', keep their own ``send_and_receive``).

A node pushes a reply's message before its objects (the arrays), so a pull that finds the message often finds some
of its objects not stored yet; Flower's grid then waits 1 s, 2 s, 4 s ... between tries (measured: a second per
round on a fast round). :func:`polling` also starts those tries 0.05 s apart (at most 1 s), as fedlm's SuperNode
(:mod:`fedlm.runtime.flower.supernode_process`) and ClientApp process (:mod:`fedlm.runtime.flower.worker`) do.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.supercore.run import Run
from flwr.superlink.grid import HttpGrid, http_grid

PULL_INITIAL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.05, 1.0


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


def shorten_object_pulls() -> None:
    """Start the deployment grid's object pulls' back-off at 0.05 s (capped at 1 s): only the grid module's
    ``pull_objects`` is replaced, in the ServerApp process that uses it."""
    http_grid.pull_objects = functools.partial(pull_objects, initial_backoff=PULL_INITIAL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S)


def polling(grid: Grid, poll_s: float = 0.2) -> Grid:
    """``grid`` in a :class:`PollingGrid`, with its object pulls' back-off started short, if it is Flower's
    deployment (HTTP) grid; else ``grid`` itself."""
    if not isinstance(grid, HttpGrid):
        return grid
    shorten_object_pulls()
    return PollingGrid(grid, poll_s)
