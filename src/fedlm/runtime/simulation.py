"""The in-process simulation runtime: one frozen base model shared by every client, adapter state swapped.

K clients cost one base model plus the adapter tensors of the update in flight; clients train one after the
other on the same ``PeftModel`` (the trainer loads the global adapter state before each client).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedlm.core.task import ClientTask, NonFiniteLossError
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.data.tokenize import TokenizedExample
from fedlm.federation.data_parallel import WorkerLost
from fedlm.federation.trainer import ClientTrainer
from fedlm.reporting.progress import Progress


@dataclass
class SimulationRuntime:
    """Runs clients sequentially in this process."""

    trainer: ClientTrainer
    client_train: Mapping[str, Sequence[TokenizedExample]]
    progress: Progress | None = None

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> list[ClientUpdate | ClientFailure]:
        """Train each client from its task's state; a NaN/Inf loss or a lost data-parallel worker becomes a
        :class:`ClientFailure`."""
        results: list[ClientUpdate | ClientFailure] = []
        total = sum(len(task.plan.lrs) for task in tasks.values())
        round_num = next(iter(tasks.values())).plan.round if tasks else 0
        who = ", ".join(tasks) if len(tasks) <= 4 else f"{len(tasks)} clients"
        bar = self.progress.task(f"federated round {round_num}: train {who}", total) if self.progress else None
        for client_id, task in tasks.items():
            on_step = bar.advance if bar is not None else None
            try:
                results.append(self.trainer.train(client_id, self.client_train[client_id], task.state, task.plan, on_step, task.context))
            except (NonFiniteLossError, WorkerLost) as exc:  # a NaN loss; a data-parallel worker died
                results.append(ClientFailure(client_id, task.plan.round, str(exc)))
        if bar is not None:
            bar.done()
        return results
