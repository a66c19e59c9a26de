"""The runtime contract: who runs the clients of a round. A runtime only moves bytes and calls the trainer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from fedlm.federation.trainer import LocalPlan
from fedlm.federation.update import ClientFailure, ClientUpdate


class Runtime(Protocol):
    """Runs local training for the chosen clients and returns one update or failure per client."""

    def train_clients(
        self, plans: Mapping[str, LocalPlan], global_state: Mapping[str, torch.Tensor]
    ) -> Sequence[ClientUpdate | ClientFailure]:
        """Train every client in ``plans`` (client name -> its plan) from ``global_state``."""
        ...
