"""The teacher's answers on disk, keyed by a hash of what was asked (model, messages, sampling parameters).

An answer is written once, atomically (a temporary file renamed into place), so concurrent requests and an
interrupted run never leave a half-written entry; a run that is resumed, or a later round, asks the teacher only
for what it has not answered yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def request_key(model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of (model, messages, params): the cache key of one request."""
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """One JSON file per answer under ``root/<first two hex digits>/<key>.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored answer of ``key``, or None (also for an unreadable entry, which is then asked again)."""
        path = self._path(key)
        try:
            value = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store ``value`` for ``key`` (atomic replace)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as sink:
            json.dump(value, sink)
        os.replace(tmp, path)
