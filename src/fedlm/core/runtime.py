"""The runtime contract: who runs the clients of a round. A runtime only moves bytes and calls the trainer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate


class Runtime(Protocol):
    """Runs local training for the chosen clients and returns one update or failure per client."""

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> Sequence[ClientUpdate | ClientFailure]:
        """Train every client in ``tasks`` (client name -> its plan, starting adapter state and extras)."""
        ...
