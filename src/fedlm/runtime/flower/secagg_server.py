"""Secure aggregation over Flower (``privacy.secure_aggregation`` with ``federation.runtime: flower``): SecAgg+
(Bell et al. 2020) as a round workflow between the server and real SuperNodes, as Flower's ``SecAggPlusWorkflow`` with
``secaggplus_mod``, driven by the same server steps as the simulation (:mod:`fedlm.privacy.secagg.workflow`).

The round of :mod:`fedlm.federation.server` is unchanged; :func:`fedlm.experiment.build_server_loop` puts two pieces
in it that share one :class:`PendingRound`:

* :class:`SecureFlowerRuntime` (the round's runtime): rounds 0-2 with the chosen clients' nodes, then round 3, whose
  message carries the task; each node trains, checks its update, encodes and masks it
  (:mod:`~fedlm.runtime.flower.secagg_node`). It returns metrics-only updates (loss, example count, timings; no
  tensor) for the nodes whose masked input arrived, failures for the others;
* :class:`FlowerSecureAggregation` (the ``secure`` part of :class:`~fedlm.federation.secure_step.SecureAggregationStep`):
  round 4 with the survivors, then the simulation's decoding and the aggregator's step on the sum.

What the server sees: public keys, encrypted shares, masked vectors (uniformly random mod 2^32 for each client
alone), the unmasking shares, the decoded sum, and each client's metrics in the clear. Too few clients at any stage,
or a share that fails authentication, aborts the round: the global model is kept and the next round runs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlm.aggregation.base import Aggregator
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.privacy.secagg.primitives import TamperedShareError
from fedlm.privacy.secagg.round import SecureAggregation, SecureRound
from fedlm.privacy.secagg.server import SecAggAbort, SecAggServer
from fedlm.privacy.secagg.workflow import key_stages, masked_stage, unmask_stage
from fedlm.runtime.flower.runtime import FlowerRuntime
from fedlm.runtime.flower.secagg_channel import FlowerChannel, TamperReported

_ABORTS = (SecAggAbort, TamperedShareError, TamperReported)


@dataclass
class PendingRound:
    """A round's protocol between its train stage and its aggregation step."""

    round_num: int
    server: SecAggServer
    channel: FlowerChannel
    requests: dict[int, Any] | None = None  # round 4's messages, once the masked inputs are in
    aborted: str | None = None
    started: float = field(default_factory=time.perf_counter)


@dataclass
class SecureFlowerRuntime:
    """The round's runtime under secure aggregation over Flower: rounds 0-3 of SecAgg+ on the chosen clients' nodes."""

    inner: FlowerRuntime
    secure: SecureAggregation
    space: Mapping[str, torch.Tensor]  # the aggregator's space (names and shapes of what is summed)
    pending: PendingRound | None = None

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> list[ClientUpdate | ClientFailure]:
        """Masked training of every client in ``tasks``: metrics-only updates, or failures naming the client."""
        round_num = next(iter(tasks.values())).plan.round if tasks else 0
        flower = self.inner
        if not flower.nodes and not flower.refused:
            flower.connect(flower.min_nodes, flower.wait_for_nodes_s)
        flower.discover(round_num)
        index = self.secure.client_indices(list(tasks))
        clients = {i: c for c, i in index.items()}
        nodes = {i: flower.nodes[c] for c, i in index.items() if c in flower.nodes}
        length = self.secure.vector_length(self.space)
        server = SecAggServer(round_num, len(index), self.secure.threshold, self.secure.params.neighbours, length, self.secure.graph_seed(round_num))
        channel = FlowerChannel(flower, round_num, length, tasks, nodes, clients)
        for i in sorted(set(clients) - set(nodes)):
            channel.leave(i, "advertise_keys", f"no SuperNode serves client {clients[i]}", unreachable=True)
        self.pending = pending = PendingRound(round_num, server, channel)
        try:
            pending.requests = masked_stage(server, channel, key_stages(server, channel))
        except _ABORTS as exc:
            pending.aborted = str(exc)
            flower.console.print(f"[yellow]round {round_num}: {exc}[/yellow]")
            flower.log.append({"round": round_num, "split": "secagg", "event": "aborted", "reason": str(exc)})
        for client in tasks:
            if client not in channel.results:  # the protocol stopped before this client's masked input
                channel.results[client] = ClientFailure(client, round_num, pending.aborted or "no masked input", unreachable=True)
        return [channel.results[c] for c in tasks]  # the simulation's order


@dataclass
class FlowerSecureAggregation:
    """The aggregation side of secure aggregation over Flower: round 4 with the nodes whose masked input arrived,
    then :meth:`SecureAggregation.decode` (the simulation's decoding, DP and aggregator step) on the sum."""

    runtime: SecureFlowerRuntime
    secure: SecureAggregation

    def skipped(self, round_num: int) -> dict[str, Any]:
        """A round with too few masked inputs for ``federation.min_clients``: why the protocol stopped, who left."""
        pending, self.runtime.pending = self.runtime.pending, None
        if pending is None or pending.round_num != round_num:
            return {}
        channel = pending.channel
        metrics: dict[str, Any] = {
            "secagg_excluded": dict(channel.excluded),
            "secagg_upload_bytes": sum(channel.up.values()),
            "secagg_download_bytes": sum(channel.down.values()),
        }
        if pending.aborted is not None:
            metrics["secagg_aborted"] = pending.aborted
        return metrics

    def aggregate(
        self, aggregator: Aggregator, space: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], chosen: Sequence[str], round_num: int
    ) -> SecureRound:
        """The aggregation of the survivors' securely summed updates, or None in the result when the round aborts."""
        pending = self.runtime.pending
        if pending is None or pending.round_num != round_num:
            return SecureRound(None, {"secagg_aborted": f"no secure-aggregation protocol ran in round {round_num}"}, {}, {})
        channel, server = pending.channel, pending.server
        clipped = int(sum(u.metrics.get("secagg_clipped_coordinates", 0) for u in updates))  # counted on the nodes
        metrics: dict[str, Any] = {"secagg_clients": len(chosen), "secagg_threshold": self.secure.threshold, "secagg_clipped_coordinates": clipped}
        total = None
        if pending.aborted is None:
            try:
                total = unmask_stage(server, channel, pending.requests or {})
            except _ABORTS as exc:
                pending.aborted = str(exc)
                channel.runtime.log.append({"round": round_num, "split": "secagg", "event": "aborted", "reason": str(exc)})
        metrics.update(
            secagg_excluded=dict(channel.excluded),
            secagg_upload_bytes=sum(channel.up.values()),
            secagg_download_bytes=sum(channel.down.values()),
            secagg_wait_s=channel.seconds,
            secagg_protocol_time_s=time.perf_counter() - pending.started,
        )
        self.runtime.pending = None
        if total is None:
            return SecureRound(None, {**metrics, "secagg_aborted": pending.aborted}, dict(channel.up), dict(channel.down))
        names_of = channel.clients
        metrics.update(
            secagg_survivors=[names_of[i] for i in sorted(server.masked)], secagg_dropped_before_input=[names_of[i] for i in sorted(server.dropped)]
        )
        result = self.secure.decode(aggregator, space, total, metrics["secagg_survivors"], round_num, metrics)
        return SecureRound(result, metrics, dict(channel.up), dict(channel.down))
