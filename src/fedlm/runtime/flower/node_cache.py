"""What a long-lived ClientApp process keeps between the messages of its SuperNode (see
:mod:`fedlm.runtime.flower.worker`): the session (base model with adapter, tokenizer, the client's data) and the
federation's client names and, for a data-parallel client (``federation.client_processes`` > 1), its worker
processes, each keyed by a hash of the node's whole config (and the client it serves), so that a
changed config (the node's file edited, another run's bundle) builds them anew.

Only what a message cannot change is kept: every train message overwrites the adapter with the task's state, and
``ClientTrainer.train`` builds a fresh optimizer and seeds torch from the task's plan, as the simulation does when it
trains its clients one after the other on one model. The client's memory (e.g. SCAFFOLD's c_i) stays in Flower's
per-node ``context.state``, never here. A fresh ClientApp process per message (Flower's default ``subprocess``
isolation) starts with an empty cache and builds everything, as before.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any

from fedlm.config.io import config_to_dict
from fedlm.config.schema import ExperimentConfig

_sessions: dict[str, Any] = {}  # key -> fedlm.experiment.Session; at most one (a node serves one client)
_names: dict[str, list[str]] = {}  # config key -> client names in partition order
_processes: dict[str, Any] = {}  # key -> the data-parallel workers of a client (federation.client_processes > 1)
_processes_lock = threading.Lock()
# one build at a time: a message that needs the session while the worker's warm-up builds it waits for that build
_session_lock, _names_lock = threading.Lock(), threading.Lock()


def config_key(config: ExperimentConfig, client: str = "") -> str:
    """SHA-256 of the node's whole config (sorted JSON: model, data paths, everything) and ``client``."""
    text = json.dumps(config_to_dict(config), sort_keys=True, default=str) + "\0" + client
    return hashlib.sha256(text.encode()).hexdigest()


def session(config: ExperimentConfig, client: str, build: Callable[[], Any]) -> tuple[Any, bool]:
    """(session, reused): the kept session of ``config`` and ``client``, else ``build()`` (dropping any other)."""
    key = config_key(config, client)
    with _session_lock:
        if key in _sessions:
            return _sessions[key], True
        _sessions.clear()  # free the old model before loading the new one
        built = build()
        _sessions[key] = built
        return built, False


def processes(config: ExperimentConfig, client: str, start: Callable[[], Any]) -> Any:
    """The data-parallel worker processes of ``config`` and ``client`` (``federation.client_processes`` > 1, a
    :class:`~fedlm.federation.data_parallel.ClientProcesses`): kept from an earlier message of this process, else
    ``start()`` after closing any other (one process group per process). A broken group (a worker died) is replaced."""
    key = config_key(config, client)
    with _processes_lock:
        kept = _processes.get(key)
        if kept is not None and kept.broken is None:
            return kept
        for old in _processes.values():
            old.close()
        _processes.clear()
        _processes[key] = start()
        return _processes[key]


def client_names(config: ExperimentConfig, compute: Callable[[], list[str]]) -> list[str]:
    """The federation's client names for ``config`` (computed once per config)."""
    key = config_key(config)
    with _names_lock:
        if key not in _names:
            _names.clear()
            _names[key] = compute()
        return list(_names[key])


def clear() -> None:
    """Forget everything kept (tests)."""
    with _session_lock, _names_lock, _processes_lock:
        _sessions.clear()
        _names.clear()
        for kept in _processes.values():
            kept.close()
        _processes.clear()
