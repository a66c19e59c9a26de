"""The round's aggregation step: the accepted updates mapped into the LoRA mode's space, the aggregator's step,
and the result mapped back; or the round skipped when too few updates arrived (``federation.min_clients``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedlm.aggregation.base import AggregationResult, Aggregator
from fedlm.aggregation.lora.mode import LoraMode
from fedlm.core.task import ClientTask, LocalPlan
from fedlm.core.update import ClientUpdate, TensorDict

SERVER_ID = "__server__"  # the client id of the server's own (root-set) update


@dataclass
class AggregateOutcome:
    """The global state after the step, whether the round was skipped, and what to log about the step."""

    state: TensorDict
    skipped: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    protocol_bytes: Mapping[str, tuple[int, int]] | None = None  # secure aggregation: (upload, download) per client


@dataclass
class RootSetUpdate:
    """The server's own update on its root set from the global state (FLTrust's g_0, Cao et al. 2021, Alg. 1),
    handed to the aggregator before it aggregates. The root set trains without DP-SGD."""

    train: Callable[[TensorDict, LocalPlan], ClientUpdate]
    plan: Callable[[int], LocalPlan]  # round -> the server's plan (the clients' learning rates, its own seed)

    def __call__(self, state: TensorDict, round_num: int, lora: LoraMode, aggregator: Aggregator) -> float:
        """Train, map into the LoRA mode's space, give it to ``aggregator``; the root-set loss."""
        update = self.train(state, self.plan(round_num))
        _, (mapped,) = lora.to_server_space(state, [update], {SERVER_ID: state}, {})
        aggregator.set_server_update(mapped)
        return float(update.metrics["loss"])


@dataclass
class AggregationStep:
    """Aggregates the accepted updates of a round with the configured aggregator and LoRA mode."""

    aggregator: Aggregator
    lora: LoraMode
    client_ranks: Mapping[str, int | None]
    min_clients: int
    root_set_update: RootSetUpdate | None = None  # for aggregators that need_server_update (FLTrust)

    def aggregate(self, state: TensorDict, tasks: Mapping[str, ClientTask], accepted: Sequence[ClientUpdate], round_num: int) -> AggregateOutcome:
        """The next global state from ``accepted`` (skipped below ``min_clients`` updates)."""
        started = time.perf_counter()
        if len(accepted) < self.min_clients:
            return AggregateOutcome(state, True, {"aggregate_time_s": time.perf_counter() - started})
        starts = {client: task.state for client, task in tasks.items()}
        space, space_updates = self.lora.to_server_space(state, accepted, starts, self.client_ranks)
        metrics: dict[str, Any] = {}
        if self.root_set_update is not None:
            metrics["server_loss"] = self.root_set_update(state, round_num, self.lora, self.aggregator)
        return self.finish(state, self.aggregator.aggregate(space, space_updates), metrics, started)

    def finish(
        self,
        state: TensorDict,
        result: AggregationResult,
        metrics: dict[str, Any],
        started: float,
        protocol_bytes: Mapping[str, tuple[int, int]] | None = None,
    ) -> AggregateOutcome:
        """Map the aggregator's result back to adapter tensors and gather the step's metrics."""
        new_state, lora_metrics = self.lora.from_server_space(result.params, state)
        metrics = {**metrics, **result.metrics, **lora_metrics}
        if result.excluded:
            metrics["excluded"] = list(result.excluded)
        if result.client_weights:
            metrics["client_weights"] = dict(result.client_weights)
        metrics["aggregate_time_s"] = time.perf_counter() - started  # the server's cost (a defence's price)
        return AggregateOutcome(new_state, False, metrics, protocol_bytes)
