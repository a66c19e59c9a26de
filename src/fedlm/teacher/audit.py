"""What each client let out to the teacher: per client one JSONL line per prompt handled, with its SHA-256 (never the
text), the round, where it came from (``own`` or ``synthetic``) and what happened (``sent``: a request left the
organisation; ``cached``: answered from the local cache, nothing left; ``rejected``: the answer lacked the expected
fields; ``failed``: no answer after the retries). An auditor can hash the client's records and check that none of
its answers' prompts, or only the synthetic ones, left.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any


def prompt_hash(messages: list[dict[str, str]]) -> str:
    """SHA-256 of the prompt's canonical JSON (the list of {role, content} messages sent)."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class TeacherAudit:
    """Appends to ``root/<client>.jsonl``; thread-safe (the requests of a client run concurrently)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()

    def path(self, client: str) -> Path:
        return self.root / f"{client}.jsonl"

    def record(self, client: str, round_num: int, messages: list[dict[str, str]], source: str, status: str, detail: str = "") -> None:
        """One line for one prompt of ``client``."""
        line: dict[str, Any] = {"round": round_num, "prompt_sha256": prompt_hash(messages), "source": source, "status": status}
        if detail:
            line["detail"] = detail
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            with self.path(client).open("a") as sink:
                sink.write(json.dumps(line) + "\n")

    def counts(self, client: str) -> Counter[str]:
        """How many lines of each status ``client`` has logged so far."""
        path = self.path(client)
        if not path.is_file():
            return Counter()
        return Counter(json.loads(line)["status"] for line in path.read_text().splitlines() if line.strip())
