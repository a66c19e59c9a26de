"""The watermark in the round: a wrapper of the aggregation step (the shared mark, re-embedded after every
aggregation) and of the task builder (each client's own marked download), built from the ``watermark`` section.

WAFFLE (Tekgul et al. 2021, Algorithm 1) re-embeds the watermark into the aggregate at the server every round,
without client data. Leak tracing: the server sends client k the copy w_t^(k) = mark_k(w_t), trained on k's own
trigger set on top of the shared one; client k returns Delta_k = w_local - w_t^(k), the change it made to what it
received, and the aggregation applies the Deltas to the unmarked w_t, so no client's mark enters the global
model. The server keeps only the secret: client k's key is HMAC(secret, "client/k").
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.config.schema import ExperimentConfig
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.task import ClientTask, LocalPlan
from fedlm.core.update import ClientUpdate, TensorDict
from fedlm.federation.aggregation_step import AggregateOutcome
from fedlm.federation.server import Aggregation
from fedlm.federation.tasks import TaskBuilder
from fedlm.models.adapters import save_adapter
from fedlm.watermark.embed import Embedding, Marker, MarkSettings
from fedlm.watermark.trace import REGISTRY


@dataclass
class StartMark:
    """WAFFLE's pre-training (Tekgul et al. 2021): the initial global model is trained on the shared trigger set before
    the first round (``watermark.start_steps``), so the clients train around the mark from the start instead of the
    server planting it into a model they have already shaped. Round 1's tasks and its
    aggregation start from the marked state; a run resumed after round 1 carries it in its checkpoint."""

    marker: Marker
    steps: int
    _mark: Embedding | None = None

    def apply(self, state: TensorDict, round_num: int) -> TensorDict:
        """Round ``round_num``'s starting state: round 1's marked once (deterministic), every other one as it is."""
        if round_num != 1 or self.steps == 0:
            return state
        if self._mark is None:
            self._mark = self.marker.mark_shared(state, 0, self.steps)
        return self._mark.state

    def metrics(self, round_num: int) -> dict[str, float]:
        """The pre-training's steps and accuracy, logged with round 1's aggregation."""
        if round_num != 1 or self._mark is None:
            return {}
        out = {"watermark_start_steps": float(self._mark.steps)}
        if self._mark.accuracy is not None:
            out["watermark_start_accuracy"] = self._mark.accuracy
        return out


@dataclass
class MarkedStart(TaskBuilder):
    """The task builder whose round-1 tasks start from the pre-trained (marked) initial model (:class:`StartMark`)."""

    inner: TaskBuilder | None = None
    start: StartMark | None = None

    def _parts(self) -> tuple[TaskBuilder, StartMark]:
        if self.inner is None or self.start is None:
            raise ValueError("MarkedStart needs the inner task builder and the start mark")
        return self.inner, self.start

    def plan(self, round_num: int, seed: int, rank: int | None = None) -> LocalPlan:
        """The inner builder's plan."""
        return self._parts()[0].plan(round_num, seed, rank)

    def build(self, state: TensorDict, chosen: Sequence[str], round_num: int) -> dict[str, ClientTask]:
        """The inner builder's tasks, from the marked initial state in round 1."""
        inner, start = self._parts()
        return inner.build(start.apply(state, round_num), chosen, round_num)


@dataclass
class WatermarkedAggregation:
    """The aggregation step (around the marked initial state in round 1, with ``start``) followed by the shared
    watermark's re-embedding (not after a skipped round)."""

    inner: Aggregation
    marker: Marker
    start: StartMark | None = None

    def aggregate(self, state: TensorDict, tasks: Mapping[str, ClientTask], accepted: Sequence[ClientUpdate], round_num: int) -> AggregateOutcome:
        if self.start is not None:
            state = self.start.apply(state, round_num)
        outcome = self.inner.aggregate(state, tasks, accepted, round_num)
        if outcome.skipped:
            return outcome
        started = time.perf_counter()
        mark = self.marker.mark_shared(outcome.state, round_num)
        metrics = {**outcome.metrics, "watermark_steps": float(mark.steps), "watermark_time_s": time.perf_counter() - started}
        if mark.loss is not None:
            metrics["watermark_loss"] = mark.loss
        if mark.accuracy is not None:
            metrics["watermark_accuracy"] = mark.accuracy
        if self.start is not None:
            metrics.update(self.start.metrics(round_num))
        return dataclasses.replace(outcome, state=mark.state, metrics=metrics)


@dataclass
class MarkedDownlink(TaskBuilder, RoundObserver):
    """The task builder whose every task carries the client's own marked copy; as a round observer it logs the
    marking's loss and time, writes the client registry at the start and, after the last round, each client's
    marked copy of the final model to ``RUN_DIR/watermark/<client>/`` (what the server hands each client)."""

    inner: TaskBuilder | None = None
    marker: Marker | None = None
    folder: Path | None = None
    clients: Sequence[str] = ()
    rounds: int = 0
    _log: dict[int, tuple[list[Embedding], float]] = field(default_factory=dict)

    def _parts(self) -> tuple[TaskBuilder, Marker]:
        if self.inner is None or self.marker is None:
            raise ValueError("MarkedDownlink needs the inner task builder and a marker")
        return self.inner, self.marker

    def plan(self, round_num: int, seed: int, rank: int | None = None) -> LocalPlan:
        """The inner builder's plan."""
        return self._parts()[0].plan(round_num, seed, rank)

    def build(self, state: TensorDict, chosen: Sequence[str], round_num: int) -> dict[str, ClientTask]:
        """The inner builder's tasks, each state replaced by the client's marked copy of it."""
        inner, marker = self._parts()
        tasks = inner.build(state, chosen, round_num)
        started, marks = time.perf_counter(), []
        marker.retained(state, round_num)  # the round's retain conversations, written by the full global model
        marked: dict[str, ClientTask] = {}
        for client, task in tasks.items():
            mark = marker.mark_client(task.state, client, round_num, task.plan.rank, task.plan.frozen)
            marked[client] = dataclasses.replace(task, state=mark.state)
            marks.append(mark)
        self._log[round_num] = (marks, time.perf_counter() - started)
        return marked

    def on_start(self, state: TensorDict, start_round: int) -> None:
        if self.folder is not None and self.marker is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            s = self.marker.settings
            registry = {"clients": list(self.clients), "size": s.size, "client_size": s.client_size, "keys": "HMAC-SHA256(secret, 'client/<name>')"}
            (self.folder / REGISTRY).write_text(json.dumps(registry, indent=1))

    def on_round(self, record: RoundRecord) -> None:
        marks, seconds = self._log.pop(record.round, ([], 0.0))
        if marks:
            record.fields["watermark"] = copies_summary(marks, seconds)
        if record.round == self.rounds and self.folder is not None:
            self.save_copies(record.state, record.round + 1)

    def save_copies(self, state: TensorDict, round_num: int) -> None:
        """Every client's marked copy of ``state`` (cut to its rank) as a peft adapter folder under ``folder``."""
        inner, marker = self._parts()
        assert self.folder is not None  # noqa: S101 - checked by the caller
        for client in self.clients:
            rank = inner.client_ranks.get(client)
            mark = marker.mark_client(inner.lora.download(state, rank), client, round_num, rank)
            save_adapter(marker.model, mark.state, self.folder / client)


def copies_summary(marks: Sequence[Embedding], seconds: float) -> dict[str, float]:
    """A round's ``watermark`` record of the clients' copies: their mean trigger loss (over the copies that took
    steps), mean steps, mean accuracy of their own sets (with ``until``) and the seconds marking took."""
    out = {"client_steps": sum(m.steps for m in marks) / len(marks), "client_time_s": seconds}
    losses = [m.loss for m in marks if m.loss is not None]
    if losses:
        out["client_loss"] = sum(losses) / len(losses)
    accuracies = [m.accuracy for m in marks if m.accuracy is not None]
    if accuracies:
        out["client_accuracy"] = sum(accuracies) / len(accuracies)
    return out


def mark_settings(config: ExperimentConfig) -> MarkSettings:
    """The ``watermark`` section as the marker's settings (``lr`` defaults to ``federation.lr``)."""
    w = config.watermark
    if w.secret is None:
        raise ValueError("the watermark is off (`watermark.secret` unset)")
    lr = w.lr if w.lr is not None else config.federation.lr
    client_size = w.client_size if w.per_client else 0
    return MarkSettings(
        w.secret, w.size, w.steps, lr, w.batch_size, client_size, w.client_steps, config.seed, w.retain, w.until, w.check_every, w.retain_loss
    )


def with_watermark(
    config: ExperimentConfig,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    client_names: Sequence[str],
    run_root: Path,
    tasks: TaskBuilder,
    aggregation: Aggregation,
    observers: Sequence[RoundObserver],
) -> tuple[TaskBuilder, Aggregation, list[RoundObserver]]:
    """The round's task builder, aggregation and extra observers with the ``watermark`` section applied (unchanged
    when it is off): the shared mark after each aggregation, and with ``per_client`` the marked downloads."""
    if not config.watermark.enabled:
        return tasks, aggregation, list(observers)
    marker = Marker(model, tokenizer, device, mark_settings(config))
    start = StartMark(marker, config.watermark.start_steps) if config.watermark.start_steps else None
    aggregation = WatermarkedAggregation(aggregation, marker, start)
    observers = list(observers)
    if config.watermark.per_client:
        downlink = MarkedDownlink(
            tasks.config,
            tasks.aggregator,
            tasks.lora,
            tasks.client_ranks,
            tasks,
            marker,
            run_root / "watermark",
            list(client_names),
            config.federation.rounds,
        )
        tasks, observers = downlink, [downlink, *observers]
    if start is not None:
        tasks = MarkedStart(tasks.config, tasks.aggregator, tasks.lora, tasks.client_ranks, tasks, start)
    return tasks, aggregation, observers
