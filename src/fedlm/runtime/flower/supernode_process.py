"""Flower's ``flower-supernode`` with a shorter idle poll: what ``fedlm flower supernode`` runs.

Flower 1.41's SuperNode loop (:func:`flwr.supernode.start_client_internal.start_client_internal`) asks the SuperLink
for a message, and when there is none sleeps a fixed 3 s; after handing a message to its ClientApp it checks for
the reply every 0.5 s, and it pulls a message's objects from the SuperLink with a back-off that starts at 1 s. On a
fast round every message waits for these (on average 1.5 s for the next message, 0.25 s for the reply), whatever
the work costs. This entry point runs Flower's own ``flower-supernode`` command, unchanged but for those waits:
the loop's sleeps are capped at ``--idle-poll`` seconds (default 0.2; only that module's ``time.sleep`` is
replaced) and its object pulls start their back-off at 0.05 s (capped at 1 s), as fedlm's ClientApp process
(:mod:`fedlm.runtime.flower.worker`) pulls from the SuperNode. Every other option is Flower's.

    python -m fedlm.runtime.flower.supernode_process [--idle-poll 0.2] FLOWER-SUPERNODE-OPTIONS...

A node started with Flower's own ``flower-supernode`` works the same, only with Flower's waits.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Any

IDLE_POLL_S = 0.2
PULL_INITIAL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.05, 1.0


class CappedClock:
    """The ``time`` module as the SuperNode loop sees it: ``sleep`` waits at most ``cap_s`` seconds."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap_s))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_waits(idle_poll_s: float = IDLE_POLL_S) -> None:
    """Cap the sleeps of Flower's SuperNode loop at ``idle_poll_s`` and start its object pulls' back-off short."""
    import flwr.supernode.start_client_internal as loop  # noqa: PLC0415 - Flower's import only where a node runs
    from flwr.supercore.inflatable.inflatable_utils import pull_objects  # noqa: PLC0415

    loop.time = CappedClock(idle_poll_s)  # type: ignore[assignment]
    loop.pull_objects = functools.partial(pull_objects, initial_backoff=PULL_INITIAL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--idle-poll", type=float, default=IDLE_POLL_S)
    args, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.idle_poll <= 0:
        parser.error(f"--idle-poll must be > 0 seconds, got {args.idle_poll}")
    shorten_waits(args.idle_poll)
    from flwr.supernode.cli import flower_supernode  # noqa: PLC0415

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
