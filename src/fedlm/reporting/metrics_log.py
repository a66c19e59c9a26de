"""Append-only JSONL log of a run's metrics (``metrics.jsonl``).

Each record is one JSON object on its own line. Every append is flushed and
fsync'ed, so a crash loses at most the line being written. Non-finite floats
(NaN, +/-inf) are stored as ``null`` so the file stays strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog"]


def _sanitize(value: Any) -> Any:
    """Make a value strict-JSON serialisable.

    Non-finite floats become ``None``; numpy scalars/0-d arrays (anything with
    ``.item()``) are unwrapped; mappings and sequences are handled recursively;
    ``Path`` objects become strings.

    Args:
        value: Any value of a record.

    Returns:
        A JSON-serialisable equivalent.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_sanitize(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _sanitize(item())
        except (TypeError, ValueError):
            pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _sanitize(tolist())
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON: {value!r}")


class MetricsLog:
    """Append-only JSONL writer/reader for ``metrics.jsonl``.

    Args:
        path: Location of the JSONL file; parent directories are created on
            the first write.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as a single JSON line, flushed and fsync'ed.

        Args:
            record: The metrics record; NaN/inf values are written as null.

        Raises:
            TypeError: If a value cannot be converted to JSON.
        """
        line = json.dumps(_sanitize(dict(record)), allow_nan=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Read all records in file order.

        A malformed *last* line (a write torn by a crash) is ignored; a
        malformed line anywhere else raises.

        Returns:
            The records; an empty list if the file does not exist.

        Raises:
            ValueError: If a line other than the last is not valid JSON.
        """
        if not self.path.exists():
            return []
        lines = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        records: list[dict[str, Any]] = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if i == len(lines) - 1:
                    break
                raise ValueError(f"{self.path}: line {i + 1} is not valid JSON: {exc}") from exc
        return records

    def truncate_after_round(self, round: int) -> None:  # noqa: A002 - API name
        """Drop every record of a round later than ``round``, atomically.

        Used when a run resumes from the checkpoint of ``round``. The file is
        rewritten into a temporary file in the same directory, fsync'ed, and
        moved over the original with ``os.replace``. Records without an
        integer ``"round"`` key (e.g. run metadata) are kept.

        Args:
            round: Last round whose records are kept.
        """
        if not self.path.exists():
            return
        kept = [r for r in self.read() if not _is_after(r, round)]
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                for rec in kept:
                    fh.write(json.dumps(_sanitize(rec), allow_nan=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, self.path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)


def _is_after(record: Mapping[str, Any], round: int) -> bool:  # noqa: A002
    """Whether a record belongs to a round strictly later than ``round``."""
    r = record.get("round")
    return isinstance(r, int) and not isinstance(r, bool) and r > round


def _fsync_dir(directory: Path) -> None:
    """Fsync a directory so a rename inside it is durable (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
