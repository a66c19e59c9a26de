"""When the handling of the current ClientApp message began, for the ``process_start_s`` timing of an update.

In a fresh ``flwr-clientapp`` process per message (Flower's ``subprocess`` isolation) it is the process's start, so
``process_start_s`` covers spawning it, the imports and pulling the task. In fedlm's long-lived ClientApp process
(:mod:`fedlm.runtime.flower.worker`) it is the moment the process acquired the task from its SuperNode, so
``process_start_s`` covers pulling the task and loading the app (no spawn, no imports).
"""

from __future__ import annotations

import time

import psutil

_acquired_at: float | None = None


def mark_task_acquired() -> None:
    """The long-lived process took a new task now."""
    global _acquired_at
    _acquired_at = time.time()


def task_started_at() -> float:
    """Epoch seconds at which this message's handling began (see the module docstring)."""
    return _acquired_at if _acquired_at is not None else psutil.Process().create_time()
