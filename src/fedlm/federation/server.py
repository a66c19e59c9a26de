"""The server loop: rounds of federated optimisation, each one as in the paper, and what observes them.

A round (McMahan et al. 2017, Algorithm 1; the server step generalised as in Reddi et al. 2021, Algorithm 1):
sample the clients, build their tasks, have the runtime train them, validate what came back, aggregate, record.
Retries, attacks and secure aggregation wrap the runtime or the aggregation step; traffic, privacy accounting, the
audit, attack outcomes, the metrics log, evaluation and checkpoints are observers attached when the run is built
(:func:`fedlm.experiment.build_server_loop`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.runtime import Runtime
from fedlm.core.sampling import ClientSampler, sample_clients
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientUpdate, TensorDict
from fedlm.federation.aggregation_step import AggregateOutcome
from fedlm.federation.tasks import TaskBuilder
from fedlm.federation.validation import RoundValidator


class Aggregation(Protocol):
    """The aggregation step of a round (:class:`~fedlm.federation.aggregation_step.AggregationStep`, or a wrapper)."""

    def aggregate(self, state: TensorDict, tasks: Mapping[str, ClientTask], accepted: Sequence[ClientUpdate], round_num: int) -> AggregateOutcome:
        """The next global state from the round's accepted updates."""
        ...


@dataclass
class Round:
    """One round: sample, build tasks, train, validate, aggregate, record."""

    client_names: list[str]
    clients_per_round: int | None
    seed: int
    tasks: TaskBuilder
    runtime: Runtime
    validator: RoundValidator
    aggregation: Aggregation
    observers: Sequence[RoundObserver] = ()
    sample: ClientSampler = sample_clients  # federation.sampling: uniform, or by contribution (fedlm.contribution)

    def run(self, state: TensorDict, round_num: int) -> RoundRecord:
        """Round ``round_num`` from the global ``state``; the record holds the new state."""
        chosen = self.sample(self.client_names, self.clients_per_round, self.seed, round_num)
        tasks = self.tasks.build(state, chosen, round_num)
        started = time.perf_counter()
        results = self.runtime.train_clients(tasks)
        accepted, failures = self.validator.split(results, state, chosen, round_num)
        outcome = self.aggregation.aggregate(state, tasks, accepted, round_num)
        received = [r for r in results if isinstance(r, ClientUpdate)]
        record = RoundRecord(
            round_num,
            chosen,
            tasks,
            received,
            accepted,
            failures,
            state,
            outcome.state,
            outcome.skipped,
            outcome.metrics,
            time.perf_counter() - started,
            outcome.protocol_bytes,
        )
        for observer in self.observers:
            observer.on_round(record)
        return record


@dataclass
class ServerLoop:
    """Runs rounds ``start+1 .. rounds`` and returns the final global adapter state; ``milestones`` (evaluation,
    checkpoints) observe each round after the round's own observers."""

    round: Round
    rounds: int
    milestones: Sequence[RoundObserver] = field(default_factory=list)

    def run(self, state: TensorDict, start_round: int) -> TensorDict:
        """Train from ``state`` after round ``start_round`` (0 for a new run)."""
        for observer in [*self.round.observers, *self.milestones]:
            observer.on_start(state, start_round)
        for round_num in range(start_round + 1, self.rounds + 1):
            record = self.round.run(state, round_num)
            for milestone in self.milestones:
                milestone.on_round(record)
            state = record.state
        return state

    def run_round(self, state: TensorDict, round_num: int) -> TensorDict:
        """One round, without the milestones."""
        return self.round.run(state, round_num).state
