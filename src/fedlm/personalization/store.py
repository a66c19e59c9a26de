"""Where a simulated client keeps its personal state: ``RUN_DIR/clients/<name>/``, on disk, never in the server.

Each time a client trains its personal part it writes a new version, ``state/round_NNNN.safetensors`` (written to a
temporary file and renamed, so a crash never leaves half a version). A round reads the newest version written
before it. Versions make resume exact: a run resumed from the checkpoint of round k first drops the versions of
rounds after k (a crash may have left some), so each client sees bit for bit what it saw in the uninterrupted run;
old versions are pruned to those a kept checkpoint may still need.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlm.core.errors import FedlmError
from fedlm.core.update import TensorDict

_PREFIX = "round_"
_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ClientStore:
    """The ``clients/`` folder of a run."""

    root: Path

    def client_dir(self, client: str) -> Path:
        """``clients/<name>/`` (a name that is not a plain folder name is refused)."""
        if not client or "/" in client or "\\" in client or client in (".", ".."):
            raise FedlmError(f"client name {client!r} cannot name a folder under clients/; rename the client")
        return self.root / client

    def rounds(self, client: str) -> list[int]:
        """The rounds after which ``client`` saved a version, oldest first."""
        folder = self.client_dir(client) / "state"
        if not folder.is_dir():
            return []
        names = [p.name for p in folder.iterdir() if p.name.startswith(_PREFIX) and p.name.endswith(_SUFFIX)]
        return sorted(int(n.removeprefix(_PREFIX).removesuffix(_SUFFIX)) for n in names)

    def _path(self, client: str, round_num: int) -> Path:
        return self.client_dir(client) / "state" / f"{_PREFIX}{round_num:04d}{_SUFFIX}"

    def save(self, client: str, round_num: int, tensors: TensorDict) -> None:
        """Write ``client``'s state after ``round_num`` (bit for bit, in the dtype it is held in)."""
        path = self._path(client, round_num)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

    def latest(self, client: str, before: int | None = None) -> TensorDict | None:
        """The newest version saved before round ``before`` (None: the newest of all); None if there is none."""
        rounds = [r for r in self.rounds(client) if before is None or r < before]
        return load_file(str(self._path(client, rounds[-1]))) if rounds else None

    def clients(self) -> list[str]:
        """Every client with a folder here."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    def rollback(self, after: int) -> None:
        """Drop every version saved after round ``after`` (a resumed run replays those rounds)."""
        for client in self.clients():
            for r in self.rounds(client):
                if r > after:
                    self._path(client, r).unlink()

    def prune(self, checkpoint_rounds: Sequence[int]) -> None:
        """Keep, per client, the newest version at or before each checkpoint round and every version after the
        last one; nothing is pruned before the first checkpoint."""
        if not checkpoint_rounds:
            return
        last = max(checkpoint_rounds)
        for client in self.clients():
            rounds = self.rounds(client)
            keep = {r for r in rounds if r > last}
            for c in checkpoint_rounds:
                older = [r for r in rounds if r <= c]
                if older:
                    keep.add(older[-1])
            for r in rounds:
                if r not in keep:
                    self._path(client, r).unlink()


def tensors_equal(a: TensorDict, b: TensorDict) -> bool:
    """Same names, shapes, dtypes and bits."""
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
