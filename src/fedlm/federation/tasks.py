"""What each sampled client downloads for a round: its plan (learning rates, batch size, seed, rank), the global
adapter cut to its rank, and the aggregator's extras."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedlm.aggregation.base import Aggregator
from fedlm.aggregation.lora.mode import LoraMode
from fedlm.config.schema import ExperimentConfig
from fedlm.core.seeding import derive_seed
from fedlm.core.task import ClientTask, LocalPlan
from fedlm.core.update import TensorDict
from fedlm.federation.schedule import lr_at


def round_lrs(config: ExperimentConfig, round_num: int) -> list[float]:
    """Per-step learning rates of round ``round_num`` (1-based) on the schedule over all rounds' local steps."""
    fed = config.federation
    total = fed.rounds * fed.local_steps
    first = (round_num - 1) * fed.local_steps
    return [lr_at((first + s) / total, base_lr=fed.lr, schedule=fed.lr_schedule, min_lr_ratio=fed.min_lr_ratio) for s in range(fed.local_steps)]


@dataclass
class TaskBuilder:
    """Builds the round's :class:`ClientTask` for every chosen client."""

    config: ExperimentConfig
    aggregator: Aggregator
    lora: LoraMode
    client_ranks: Mapping[str, int | None]

    def plan(self, round_num: int, seed: int, rank: int | None = None) -> LocalPlan:
        """The round's learning rates and batch size with ``seed``, ``rank`` and the LoRA mode's frozen factor."""
        return LocalPlan(
            round_num, round_lrs(self.config, round_num), self.config.federation.batch_size, seed, rank, self.lora.frozen_factor(round_num)
        )

    def build(self, state: TensorDict, chosen: Sequence[str], round_num: int) -> dict[str, ClientTask]:
        """Each chosen client's task, seeded from (seed, round, client)."""
        self.lora.begin_round(round_num)
        return {client: self.task(client, state, round_num) for client in chosen}

    def task(self, client_id: str, state: TensorDict, round_num: int) -> ClientTask:
        """What ``client_id`` downloads this round: its plan, the global adapter cut to its rank, the extras."""
        rank = self.client_ranks.get(client_id)
        plan = self.plan(round_num, derive_seed(self.config.seed, "local", round_num, client_id), rank)
        context = dataclasses.replace(self.aggregator.client_context(client_id, round_num), rank=rank)
        return ClientTask(plan, self.lora.download(state, rank), context)
