"""One federated round under secure aggregation: what each client encodes, the protocol, what the server decodes.

Client side (run for each client where it trains: the simulation does it here, a deployment in its client app):
the delta in the aggregator's space (the adapter tensors under the ``naive``/``ffa`` LoRA modes), then

* without DP: its FedAvg weight w_k = min(n_k, max_weight) / max_weight times the delta, with w_k c appended (in the
  range [-c, c] whatever c), so the
  sum gives sum_k w_k Delta_k and sum_k w_k and the server divides (Flower's SecAgg+ carries the weight the same way);
* with client-level DP: the delta clipped to C (``central``: the server adds the noise to the decoded sum;
  ``distributed``: the client adds its noise share too), weight 1;

flattened in sorted tensor-name order and quantised (:mod:`~fedlm.privacy.secagg.quantize`). Clients of the round
that have no update (training failed, update invalid) take part in the key stages and drop before the masked input,
which the protocol recovers from. The server sees only the decoded sum. Note on distributed DP: the Gaussian shares
are quantised with the update (the continuous approximation; Kairouz, Liu & Steinke 2021 give the exact discrete one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlm.aggregation.base import AggregationResult, Aggregator
from fedlm.config.schema import SecureAggregationConfig
from fedlm.core.seeding import derive_seed
from fedlm.core.update import ClientUpdate
from fedlm.privacy.client_dp import DifferentiallyPrivate
from fedlm.privacy.dp_math import clip_update
from fedlm.privacy.secagg.primitives import TamperedShareError
from fedlm.privacy.secagg.quantize import dequantize_sum, flatten, quantize, sum_error_bound, unflatten
from fedlm.privacy.secagg.server import SecAggAbort
from fedlm.privacy.secagg.simulate import Tamper, secure_sum

#: Name of the one update (the decoded mean) the aggregator receives.
SECURE_MEAN_ID = "__secure_mean__"


@dataclass
class SecureRound:
    """What a round under secure aggregation produced: the aggregation (None when aborted) and its metrics."""

    result: AggregationResult | None
    metrics: dict[str, Any]
    upload_bytes: dict[str, int]
    download_bytes: dict[str, int]


@dataclass
class SecureAggregation:
    """SecAgg+ between the round's clients and the server, composed with client-level DP when configured."""

    params: SecureAggregationConfig
    threshold: int
    seed: int
    drop: Mapping[int, Mapping[str, set[str]]] | None = None  # tests, benchmarks: round -> stage -> clients that drop
    tamper: Tamper | None = None

    def encode(self, update: ClientUpdate, names: Sequence[str], dp: DifferentiallyPrivate | None) -> tuple[np.ndarray, int]:
        """Client side: the update's quantised codes and how many coordinates fell outside the range."""
        if dp is None:
            weight = min(update.num_examples, self.params.max_weight) / self.params.max_weight
            tensors: Mapping[str, torch.Tensor] = {n: update.tensors[n] * weight for n in names}
        elif dp.params.mode == "distributed":
            weight, tensors = 1.0, dp.privatize_client_update(update).tensors
        else:
            weight, tensors = 1.0, clip_update(update.tensors, dp.clip, client_id=update.client_id)[0]
        vector = np.concatenate([flatten(tensors, names), [weight * self.params.clip_range]])  # w <= 1: in range
        rng = np.random.default_rng(derive_seed(self.seed, "secagg-rounding", update.round, update.client_id))
        return quantize(vector, self.params.clip_range, self.params.quantization_bits, rng)

    def client_codes(self, aggregator: Aggregator, space: Mapping[str, torch.Tensor], update: ClientUpdate) -> tuple[np.ndarray, int]:
        """Client side, wherever it runs: :meth:`encode` in the order of ``space``, under the run's DP wrapper if any."""
        dp = aggregator if isinstance(aggregator, DifferentiallyPrivate) else None
        return self.encode(update, sorted(space), dp)

    @staticmethod
    def client_indices(chosen: Sequence[str]) -> dict[str, int]:
        """The protocol's 1-based client index of each of the round's clients (sorted by name)."""
        return {c: i + 1 for i, c in enumerate(sorted(chosen))}

    def vector_length(self, space: Mapping[str, torch.Tensor]) -> int:
        """How many codes each client sends: every coordinate of ``space`` and its weight."""
        return sum(t.numel() for t in space.values()) + 1

    def graph_seed(self, round_num: int) -> int:
        """The public randomness of round ``round_num``'s SecAgg+ graph."""
        return derive_seed(self.seed, "secagg-graph", round_num)

    def decode(
        self,
        aggregator: Aggregator,
        space: Mapping[str, torch.Tensor],
        total: np.ndarray,
        survivors: Sequence[str],
        round_num: int,
        metrics: dict[str, Any],
    ) -> AggregationResult:
        """Server side: the aggregator's step on the decoded sum of the ``survivors``' codes (``metrics`` gains the
        sum's error bound). With DP the wrapper noises the sum (``central``) or only divides it (``distributed``)."""
        names = sorted(space)
        dp = aggregator if isinstance(aggregator, DifferentiallyPrivate) else None
        decoded = dequantize_sum(total, len(survivors), self.params.clip_range, self.params.quantization_bits)
        summed, weight = unflatten(decoded[:-1], space, names), float(decoded[-1]) / self.params.clip_range
        metrics["secagg_sum_error_bound"] = sum_error_bound(len(survivors), self.params.clip_range, self.params.quantization_bits)
        if dp is not None:
            return dp.aggregate_sum(space, summed, len(survivors), round_num)
        mean = {n: t / max(weight, 1e-12) for n, t in summed.items()}
        examples = max(1, round(weight * self.params.max_weight))
        result = aggregator.aggregate(space, [ClientUpdate(SECURE_MEAN_ID, round_num, examples, mean)])
        return dataclasses.replace(result, metrics={**result.metrics, "num_updates": float(len(survivors))})

    def skipped(self, round_num: int) -> dict[str, Any]:
        """Nothing to log of a round skipped before the protocol: in the simulation it runs after validation."""
        return {}

    def aggregate(
        self, aggregator: Aggregator, space: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], chosen: Sequence[str], round_num: int
    ) -> SecureRound:
        """Encode every update, run the protocol over the round's clients, decode the sum and aggregate it."""
        order = sorted(chosen)
        index = self.client_indices(order)
        by_client = {u.client_id: u for u in updates}
        length = self.vector_length(space)
        codes, outside = {}, 0
        for client in order:
            if client in by_client:
                codes[index[client]], out = self.client_codes(aggregator, space, by_client[client])
                outside += out
            else:
                codes[index[client]] = np.zeros(length, dtype=np.uint32)
        planned = (self.drop or {}).get(round_num, {})
        drop = {stage: {index[c] for c in who if c in index} for stage, who in planned.items()}
        drop.setdefault("masked_input", set()).update(index[c] for c in order if c not in by_client)
        metrics: dict[str, Any] = {"secagg_clients": len(order), "secagg_threshold": self.threshold, "secagg_clipped_coordinates": outside}
        try:
            outcome = secure_sum(
                codes,
                round_num=round_num,
                threshold=self.threshold,
                neighbours=self.params.neighbours,
                graph_seed=self.graph_seed(round_num),
                drop=drop,
                tamper=self.tamper,
            )
        except (SecAggAbort, TamperedShareError) as exc:
            return SecureRound(None, {**metrics, "secagg_aborted": str(exc)}, {}, {})
        names_of = {i: c for c, i in index.items()}
        survivors = [names_of[i] for i in outcome.survivors]
        metrics.update(
            secagg_survivors=survivors,
            secagg_dropped_before_input=[names_of[i] for i in outcome.dropped_before_input],
            secagg_client_time_s=outcome.client_seconds,
            secagg_server_time_s=outcome.server_seconds,
            secagg_upload_bytes=sum(outcome.upload_bytes.values()),
            secagg_download_bytes=sum(outcome.download_bytes.values()),
        )
        result = self.decode(aggregator, space, outcome.total, survivors, round_num, metrics)
        return SecureRound(
            result, metrics, {names_of[i]: b for i, b in outcome.upload_bytes.items()}, {names_of[i]: b for i, b in outcome.download_bytes.items()}
        )
