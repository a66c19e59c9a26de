"""Resumable checkpoints every ``federation.checkpoint_every`` rounds and after the last one."""

from __future__ import annotations

from dataclasses import dataclass

from fedlm.aggregation.base import Aggregator
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.federation.checkpoint import Checkpoint, save_checkpoint
from fedlm.reporting.run_dir import RunDir


@dataclass
class Checkpointer(RoundObserver):
    """Saves the global state, the aggregator's state and the resolved config when due."""

    run_dir: RunDir
    aggregator: Aggregator
    config_yaml: str
    seed: int
    every: int
    rounds: int
    keep: int

    def on_round(self, record: RoundRecord) -> None:
        if record.round % self.every == 0 or record.round == self.rounds:
            ckpt = Checkpoint(record.round, record.state, self.aggregator.state_dict(), {"seed": self.seed})
            save_checkpoint(self.run_dir.checkpoints, ckpt, self.config_yaml, self.keep)
