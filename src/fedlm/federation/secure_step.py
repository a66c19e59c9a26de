"""Secure aggregation as a wrapper around the aggregation step (``privacy.secure_aggregation``): the round's
clients run SecAgg+ (Bell et al. 2020) and the aggregator gets only their decoded sum."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedlm.core.task import ClientTask
from fedlm.core.update import ClientUpdate, TensorDict
from fedlm.federation.aggregation_step import AggregateOutcome, AggregationStep
from fedlm.privacy.secagg.round import SecureAggregation


@dataclass
class SecureAggregationStep:
    """Runs the protocol over the round's clients, then the inner step's aggregator on the sum; a protocol abort
    (too many dropouts, a tampered share) skips the round and keeps the global state."""

    inner: AggregationStep
    secure: SecureAggregation

    def aggregate(self, state: TensorDict, tasks: Mapping[str, ClientTask], accepted: Sequence[ClientUpdate],
                  round_num: int) -> AggregateOutcome:
        """The next global state from the securely summed updates."""
        if len(accepted) < self.inner.min_clients:
            return self.inner.aggregate(state, tasks, accepted, round_num)
        started = time.perf_counter()
        space = self.inner.lora.to_server_space(state, [], {}, {})[0]
        secure = self.secure.aggregate(self.inner.aggregator, space, accepted, list(tasks), round_num)
        sent = {client: (secure.upload_bytes.get(client, 0), secure.download_bytes.get(client, 0)) for client in tasks}
        if secure.result is None:  # the protocol aborted
            return AggregateOutcome(state, True, {**secure.metrics, "aggregate_time_s": time.perf_counter() - started}, sent)
        return self.inner.finish(state, secure.result, dict(secure.metrics), started, sent)
