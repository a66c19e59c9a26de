"""The cloud round of hierarchical federated learning (HierFAVG, Liu et al. 2020, Algorithm 1; :mod:`.edge`).

Sample the round's clients as a flat round does, group them by edge, let each edge run ``edge_rounds`` edge rounds
(build tasks from the edge model, train, validate, average), then aggregate the edges' changes with the run's
aggregation step, and record. The edge rounds reuse the flat round's parts: its task builder, runtime (with its
wrappers), validator and aggregation step; bytes are counted per tier (client <-> edge, edge <-> cloud).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedlm.aggregation.lora_structure import wire_form
from fedlm.core.round import RoundRecord
from fedlm.core.task import ClientContext, ClientTask, LocalPlan
from fedlm.core.update import ClientFailure, ClientUpdate, TensorDict
from fedlm.federation.observers.traffic import TrafficMeter
from fedlm.federation.server import Round
from fedlm.federation.wire import serialized_bytes
from fedlm.hierarchy.edge import Edge, edge_round_task


@dataclass
class EdgeRun:
    """What one edge did in a cloud round: every edge round's tasks, updates and failures, and its bytes."""

    edge: Edge
    tasks: dict[str, ClientTask] = field(default_factory=dict)  # each client's task of the last edge round
    received: list[ClientUpdate] = field(default_factory=list)
    accepted: list[ClientUpdate] = field(default_factory=list)
    failures: list[ClientFailure] = field(default_factory=list)
    traffic: dict[str, dict[str, float]] = field(default_factory=dict)  # client -> bytes summed over the edge rounds

    def add_traffic(self, traffic: Mapping[str, Mapping[str, float]]) -> None:
        """Add one edge round's per-client bytes (the truncation error is kept, not summed)."""
        for client, row in traffic.items():
            total = self.traffic.setdefault(client, {"download_bytes": 0, "upload_bytes": 0})
            total["download_bytes"] += row["download_bytes"]
            total["upload_bytes"] += row["upload_bytes"]
            total["download_truncation_error"] = row["download_truncation_error"]


@dataclass
class HierarchicalRound(Round):
    """A :class:`Round` whose clients train under edge aggregators: ``groups`` (edge -> clients), ``edge_rounds``
    edge aggregations per cloud aggregation. ``observers`` must not hold a :class:`TrafficMeter`: this round fills
    ``record.traffic`` (client <-> edge bytes) itself, and ``record.fields["hierarchy"]`` with the bytes per tier.
    ``record.accepted`` holds the accepted client updates of every edge round (metric ``edge_round``), ``record.tasks``
    each client's task of the last edge round, and ``record.metrics`` the cloud aggregation's."""

    groups: Mapping[str, Sequence[str]] = field(default_factory=dict)
    edge_rounds: int = 1

    def run(self, state: TensorDict, round_num: int) -> RoundRecord:
        """Cloud round ``round_num`` from the cloud model ``state``; the record holds the new cloud model."""
        chosen = self.sample(self.client_names, self.clients_per_round, self.seed, round_num)
        started = time.perf_counter()
        picked = set(chosen)
        runs = {edge: self.run_edge(edge, [c for c in members if c in picked], state, round_num) for edge, members in self.groups.items()}
        runs = {edge: run for edge, run in runs.items() if run.tasks}  # an edge without sampled clients sits out
        uploads = [u for run in runs.values() if (u := run.edge.update(round_num, [x.metrics["loss"] for x in run.accepted])) is not None]
        cloud_tasks = {edge: ClientTask(LocalPlan(round_num, [], 0, 0), state, ClientContext(edge, round_num)) for edge in runs}
        outcome = self.aggregation.aggregate(state, cloud_tasks, uploads, round_num)
        record = RoundRecord(
            round_num,
            chosen,
            {c: t for run in runs.values() for c, t in run.tasks.items()},
            [u for run in runs.values() for u in run.received],
            [u for run in runs.values() for u in run.accepted],
            [f for run in runs.values() for f in run.failures],
            state,
            outcome.state,
            outcome.skipped,
            outcome.metrics,
            time.perf_counter() - started,
        )
        record.traffic = {c: row for run in runs.values() for c, row in run.traffic.items()}
        record.fields["hierarchy"] = tier_bytes(runs, state, uploads, self.edge_rounds)
        for observer in self.observers:
            observer.on_round(record)
        return record

    def run_edge(self, name: str, clients: list[str], state: TensorDict, round_num: int) -> EdgeRun:
        """``edge_rounds`` edge rounds of edge ``name`` over its sampled ``clients``, from the cloud model."""
        run = EdgeRun(Edge(name, state, self.tasks.lora, self.tasks.client_ranks))
        if not clients:
            return run
        config = self.tasks.config
        for e in range(1, self.edge_rounds + 1):
            flat = self.tasks.build(run.edge.state, clients, round_num)
            tasks = {c: edge_round_task(t, config, c, e, self.edge_rounds) for c, t in flat.items()}
            results = self.runtime.train_clients(tasks)
            accepted, failures = self.validator.split(results, run.edge.state, clients, round_num)
            run.edge.aggregate(tasks, accepted)
            received = [r for r in results if isinstance(r, ClientUpdate)]
            sub = RoundRecord(round_num, clients, tasks, received, accepted, failures, run.edge.state, run.edge.state, False, {}, 0.0)
            TrafficMeter().on_round(sub)  # the flat round's byte count, for this edge round's client <-> edge messages
            run.add_traffic(sub.traffic)
            run.tasks.update(tasks)
            run.received += received
            run.accepted += [_tagged(u, e) for u in accepted]
            run.failures += failures
        return run


def _tagged(update: ClientUpdate, edge_round: int) -> ClientUpdate:
    """``update`` with its edge round in its metrics (logged on its ``train`` record)."""
    return dataclasses.replace(update, metrics={**update.metrics, "edge_round": float(edge_round)})


def tier_bytes(runs: Mapping[str, EdgeRun], state: TensorDict, uploads: Sequence[ClientUpdate], edge_rounds: int) -> dict[str, Any]:
    """Bytes per tier: each edge's clients' downloads and uploads (all edge rounds), its download of the cloud model
    and its upload of its change, and the totals per tier."""
    cloud_model = serialized_bytes(wire_form(state, None))
    sent = {u.client_id: serialized_bytes(u.tensors) for u in uploads}
    edges: dict[str, dict[str, Any]] = {}
    for name, run in runs.items():
        edges[name] = {
            "clients": list(run.tasks),
            "updates": len(run.accepted),
            "num_examples": sum(run.edge.contributors.values()),
            "client_edge_download_bytes": sum(row["download_bytes"] for row in run.traffic.values()),
            "client_edge_upload_bytes": sum(row["upload_bytes"] for row in run.traffic.values()),
            "edge_cloud_download_bytes": cloud_model,
            "edge_cloud_upload_bytes": sent.get(name, 0),
        }
    keys = ("client_edge_download_bytes", "client_edge_upload_bytes", "edge_cloud_download_bytes", "edge_cloud_upload_bytes")
    return {"edge_rounds": edge_rounds, **{k: sum(e[k] for e in edges.values()) for k in keys}, "edges": edges}
