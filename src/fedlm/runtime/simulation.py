"""The in-process simulation runtime: one frozen base model shared by every client, adapter state swapped.

K clients cost one base model plus the adapter tensors of the update in flight; clients train one after the
other on the same ``PeftModel`` (the trainer loads the global adapter state before each client).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlm.data.tokenize import TokenizedExample
from fedlm.federation.trainer import ClientTrainer, LocalPlan, NonFiniteLossError
from fedlm.federation.update import ClientFailure, ClientUpdate
from fedlm.reporting.progress import Progress


@dataclass
class SimulationRuntime:
    """Runs clients sequentially in this process."""

    trainer: ClientTrainer
    client_train: Mapping[str, Sequence[TokenizedExample]]
    progress: Progress | None = None

    def train_clients(
        self, plans: Mapping[str, LocalPlan], global_state: Mapping[str, torch.Tensor]
    ) -> list[ClientUpdate | ClientFailure]:
        """Train each planned client from ``global_state``; a NaN/Inf loss becomes a :class:`ClientFailure`."""
        results: list[ClientUpdate | ClientFailure] = []
        total = sum(len(plan.lrs) for plan in plans.values())
        task = self.progress.task("train", total) if self.progress else None
        for client_id, plan in plans.items():
            on_step = task.advance if task is not None else None
            try:
                results.append(self.trainer.train(client_id, self.client_train[client_id], global_state, plan, on_step))
            except NonFiniteLossError as exc:
                results.append(ClientFailure(client_id, plan.round, str(exc)))
        if task is not None:
            task.done()
        return results
