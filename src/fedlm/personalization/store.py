"""Where a simulated client keeps its personal state: ``RUN_DIR/clients/<name>/``, on disk, never in the server.

Each time a client trains its personal part it writes a new version, ``state/round_NNNN.safetensors`` (written to a
temporary file and renamed, so a crash never leaves half a version). A round reads the newest version written
before it. Versions make resume exact: a run resumed from the checkpoint of round k first drops the versions of
rounds after k (a crash may have left some), so each client sees bit for bit what it saw in the uninterrupted run;
old versions are pruned to those a kept checkpoint may still need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedlm.core.client_state import DiskVersions
from fedlm.core.update import TensorDict


@dataclass(frozen=True)
class ClientStore(DiskVersions):
    """The ``clients/`` folder of a run; a client's personal versions are ``clients/<name>/state/`` (the versioned
    writes, reads, rollback and pruning of :class:`~fedlm.core.client_state.DiskVersions`)."""

    kind: str = "state"

    def client_dir(self, client: str) -> Path:
        """``clients/<name>/`` (a name that is not a plain folder name is refused)."""
        return self.folder(client).parent


def tensors_equal(a: TensorDict, b: TensorDict) -> bool:
    """Same names, shapes, dtypes and bits."""
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
