"""State that belongs to a client between its rounds (SCAFFOLD's control variate c_i, error-feedback residuals), kept
where the server-side code can reach it in the simulation: in memory, or (:meth:`ClientStates.spill`) on disk under
``RUN_DIR/clients/<name>/<kind>/``, read only for the round's clients, so that memory stays flat in the number of clients.

On disk every write is a version, ``round_NNNN.safetensors`` for the round that wrote it (a temporary file renamed,
so a crash never leaves half a version); a read takes the newest version. A run resumed after round k first drops the
versions of later rounds (:meth:`DiskVersions.rollback`), so each client reads bit for bit what it read in the
uninterrupted run; older versions are pruned to those a kept checkpoint may still need.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlm.core.errors import FedlmError
from fedlm.core.update import TensorDict

_PREFIX, _SUFFIX = "round_", ".safetensors"


@dataclass(frozen=True)
class DiskVersions:
    """Versions of one kind of client state: ``root/<client>/<kind>/round_NNNN.safetensors``."""

    root: Path
    kind: str

    def folder(self, client: str) -> Path:
        """``root/<client>/<kind>/`` (a client name that is not a plain folder name is refused)."""
        if not client or "/" in client or "\\" in client or client in (".", ".."):
            raise FedlmError(f"client name {client!r} cannot name a folder under clients/; rename the client")
        return self.root / client / self.kind

    def rounds(self, client: str) -> list[int]:
        """The rounds in which ``client``'s state was written, oldest first."""
        folder = self.folder(client)
        if not folder.is_dir():
            return []
        names = [p.name for p in folder.iterdir() if p.name.startswith(_PREFIX) and p.name.endswith(_SUFFIX)]
        return sorted(int(n.removeprefix(_PREFIX).removesuffix(_SUFFIX)) for n in names)

    def _path(self, client: str, round_num: int) -> Path:
        return self.folder(client) / f"{_PREFIX}{round_num:04d}{_SUFFIX}"

    def save(self, client: str, round_num: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write ``client``'s state as of ``round_num`` (bit for bit, in its dtype)."""
        path = self._path(client, round_num)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

    def latest(self, client: str, before: int | None = None) -> TensorDict | None:
        """The newest version of ``client``'s state written before round ``before`` (None: the newest of all), or None."""
        rounds = [r for r in self.rounds(client) if before is None or r < before]
        return load_file(str(self._path(client, rounds[-1]))) if rounds else None

    def clients(self) -> list[str]:
        """Every client with at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / self.kind).is_dir() and self.rounds(p.name))

    def rollback(self, after: int) -> None:
        """Drop every version written after round ``after`` (a resumed run replays those rounds)."""
        for client in self.clients():
            for r in self.rounds(client):
                if r > after:
                    self._path(client, r).unlink()

    def prune(self, checkpoint_rounds: Sequence[int]) -> None:
        """Keep, per client, the newest version at or before each checkpoint round and every later one (nothing is
        pruned before the first checkpoint)."""
        if not checkpoint_rounds:
            return
        last = max(checkpoint_rounds)
        for client in self.clients():
            rounds = self.rounds(client)
            keep = {r for r in rounds if r > last} | {max(older) for c in checkpoint_rounds if (older := [r for r in rounds if r <= c])}
            for r in rounds:
                if r not in keep:
                    self._path(client, r).unlink()


class ClientStates(MutableMapping[str, TensorDict]):
    """Client name -> its state: a dict until :meth:`spill`, then :class:`DiskVersions` written at :attr:`round`.

    An aggregator or wrapper that keeps per-client state holds one of these; the run (simulation only) finds it and
    spills it (:mod:`fedlm.federation.observers.client_state`). In memory, checkpoints carry the states
    (:meth:`checkpoint_state`); spilled, the versions on disk are the state and checkpoints carry none."""

    def __init__(self) -> None:
        self._memory: dict[str, TensorDict] = {}
        self._disk: DiskVersions | None = None
        self.round = 0  # the round whose writes are being made (spilled)

    @property
    def disk(self) -> DiskVersions | None:
        """Where the states are kept once spilled (None: in memory)."""
        return self._disk

    def spill(self, disk: DiskVersions, start_round: int) -> None:
        """Keep the states in ``disk`` from now on: versions after ``start_round`` dropped (a resumed run), states
        held in memory (a checkpoint from an in-memory run) written as of ``start_round``, memory emptied."""
        disk.rollback(start_round)
        for client, state in self._memory.items():
            disk.save(client, start_round, state)
        self._disk, self._memory, self.round = disk, {}, start_round + 1

    def __getitem__(self, client: str) -> TensorDict:
        if self._disk is None:
            return self._memory[client]
        state = self._disk.latest(client)
        if state is None:
            raise KeyError(client)
        return state

    def __setitem__(self, client: str, state: TensorDict) -> None:
        if self._disk is None:
            self._memory[client] = state
        else:
            self._disk.save(client, self.round, state)

    def __delitem__(self, client: str) -> None:
        if self._disk is not None:
            raise TypeError("a spilled client state is versioned on disk; it is not deleted")
        del self._memory[client]

    def __iter__(self) -> Iterator[str]:
        return iter(self._disk.clients() if self._disk is not None else list(self._memory))

    def __len__(self) -> int:
        return len(self._disk.clients()) if self._disk is not None else len(self._memory)

    def checkpoint_state(self) -> dict[str, TensorDict]:
        """What a checkpoint holds: every state while in memory, nothing once spilled (the disk versions are it)."""
        return {c: dict(s) for c, s in self._memory.items()}

    def load(self, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Restore :meth:`checkpoint_state` (before :meth:`spill`, which then writes them out)."""
        self._memory = {c: dict(s) for c, s in states.items()}
