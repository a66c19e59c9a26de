"""When the handling of the current ClientApp message began, for the ``process_start_s`` timing of an update.

In a fresh ``flwr-clientapp`` process per message (Flower's ``subprocess`` isolation) it is the process's start, so
``process_start_s`` covers spawning it, the imports and pulling the task. In fedlm's long-lived ClientApp process
(:mod:`fedlm.runtime.flower.worker`) it is the moment the process acquired the task from its SuperNode, so
``process_start_s`` covers pulling the task and loading the app (no spawn, no imports).
"""

from __future__ import annotations

import threading
import time

import psutil

_handled = False  # whether this process handled a message before (without the long-lived worker's marks)
_task = threading.local()  # per thread: the long-lived process runs each task in its own thread


def mark_task_acquired() -> None:
    """The long-lived process took a new task now (in this thread)."""
    _task.acquired_at, _task.pulled_at = time.time(), None


def mark_task_pulled() -> None:
    """The long-lived process holds the task's message now (its objects came from the SuperNode)."""
    _task.pulled_at = time.time()


def task_pull_s() -> float | None:
    """Seconds from acquiring the task to holding its message (long-lived process only): mostly the wait for the
    SuperNode to receive the message's objects from the SuperLink."""
    acquired, pulled = getattr(_task, "acquired_at", None), getattr(_task, "pulled_at", None)
    return None if acquired is None or pulled is None else pulled - acquired


def task_started_at() -> float:
    """Epoch seconds at which this message's handling began (see the module docstring); a process that Flower keeps
    for many messages without fedlm's worker (a Ray worker of the simulation engine) pays its start once, at its
    first message, and nothing at the later ones."""
    global _handled  # noqa: PLW0603 - once per process
    acquired = getattr(_task, "acquired_at", None)
    if acquired is not None:
        return acquired
    if _handled:
        return time.time()
    _handled = True
    return psutil.Process().create_time()
