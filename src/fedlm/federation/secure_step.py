"""Secure aggregation as a wrapper around the aggregation step (``privacy.secure_aggregation``): the round's
clients run SecAgg+ (Bell et al. 2020) and the aggregator gets only their decoded sum.

The protocol runs in-process in the simulation (:class:`~fedlm.privacy.secagg.round.SecureAggregation`) and between
the server and the SuperNodes over Flower (:class:`~fedlm.runtime.flower.secagg_server.FlowerSecureAggregation`,
whose runtime trains and masks on the nodes, so the round's updates carry metrics only and are checked by
:class:`MaskedRoundValidator`); both are chosen in :func:`fedlm.experiment.build_server_loop`."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedlm.aggregation.base import Aggregator
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate, TensorDict
from fedlm.federation.aggregation_step import AggregateOutcome, AggregationStep
from fedlm.federation.validation import RoundValidator
from fedlm.privacy.secagg.round import SecureRound


class SecureSum(Protocol):
    """SecAgg+ over the round's clients and the aggregator's step on the decoded sum (simulation or Flower)."""

    def aggregate(
        self, aggregator: Aggregator, space: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], chosen: Sequence[str], round_num: int
    ) -> SecureRound:
        """The aggregation of the securely summed updates (``result`` None when the protocol aborted)."""
        ...

    def skipped(self, round_num: int) -> dict[str, Any]:
        """What to log of a round skipped before its sum (fewer than ``federation.min_clients`` updates)."""
        ...


@dataclass
class SecureAggregationStep:
    """Runs the protocol over the round's clients, then the inner step's aggregator on the sum; a protocol abort
    (too many dropouts, a tampered share) skips the round and keeps the global state."""

    inner: AggregationStep
    secure: SecureSum

    def aggregate(self, state: TensorDict, tasks: Mapping[str, ClientTask], accepted: Sequence[ClientUpdate], round_num: int) -> AggregateOutcome:
        """The next global state from the securely summed updates."""
        if len(accepted) < self.inner.min_clients:
            outcome = self.inner.aggregate(state, tasks, accepted, round_num)
            outcome.metrics.update(self.secure.skipped(round_num))
            return outcome
        started = time.perf_counter()
        space = self.inner.lora.to_server_space(state, [], {}, {})[0]
        secure = self.secure.aggregate(self.inner.aggregator, space, accepted, list(tasks), round_num)
        sent = {client: (secure.upload_bytes.get(client, 0), secure.download_bytes.get(client, 0)) for client in tasks}
        if secure.result is None:  # the protocol aborted
            return AggregateOutcome(state, True, {**secure.metrics, "aggregate_time_s": time.perf_counter() - started}, sent)
        return self.inner.finish(state, secure.result, dict(secure.metrics), started, sent)


@dataclass(frozen=True)
class MaskedRoundValidator(RoundValidator):
    """The round's checks when updates arrive masked (secure aggregation over Flower): each node checked its own
    tensors before masking, so an update here carries metrics only and must have no tensor; round, client and
    example count are checked as for any update."""

    def split(
        self, results: Sequence[ClientUpdate | ClientFailure], state: Mapping[str, torch.Tensor], chosen: Collection[str], round_num: int
    ) -> tuple[list[ClientUpdate], list[ClientFailure]]:
        """(accepted metrics-only updates, failures and rejections) of ``results``."""
        return super().split(results, {}, chosen, round_num)
