"""The evaluation after every stage: the global model on every slice's test records, and the forgetting so far.

After the last round of each stage (and at round 0 with ``eval.at_start``, the baseline of forward transfer) the
global state is scored on each slice's test records (one pass over them all, without generation: the loss, and the
multiple-choice or preference accuracy when the data has them). Each slice's scores are a ``split: continual`` record
of ``metrics.jsonl``; the summary of :mod:`fedlm.continual.metrics` after the stage is a ``split: forgetting`` record
per metric. The matrix is read back from ``metrics.jsonl``, so a resumed run continues it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedlm.continual.metrics import transfer_summary
from fedlm.continual.schedule import Stream
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.update import TensorDict
from fedlm.evaluation.evaluator import GLOBAL_SPLIT, Evaluator
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole

SLICE_SPLIT = "continual"
SUMMARY_SPLIT = "forgetting"
#: the metrics the matrix is built for, when the records have them (the loss enters as its negative)
MATRIX_METRICS: tuple[str, ...] = ("loss", "mc_accuracy", "preference_accuracy")


def higher_is_better(metric: str, value: float) -> float:
    """The score of ``value`` with "higher is better" (a loss is negated)."""
    return -value if metric == "loss" else value


def matrices(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Per metric: stage -> slice -> raw value, from the ``split: continual`` records (the last of a stage wins)."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for r in records:
        if r.get("split") != SLICE_SPLIT:
            continue
        for metric in MATRIX_METRICS:
            if r.get(metric) is not None:
                out.setdefault(metric, {}).setdefault(int(r["stage"]), {})[str(r["slice"])] = float(r[metric])
    return out


def own_stages(stream: Stream) -> dict[str, int]:
    """Each slice's stage: the one in which it first arrives."""
    return {s: stage.index for stage in stream.stages() for s in stage.slices}


def summaries(records: Sequence[Mapping[str, Any]], own: Mapping[str, int], stage: int) -> dict[str, dict[str, float | None]]:
    """Per metric after ``stage``: ``average`` (A_k in the metric's units) and ``forgetting``, ``bwt``, ``fwt`` on the
    "higher is better" scale (for the loss, of -loss)."""
    out = {}
    for metric, raw in matrices(records).items():
        scores = {k: {j: higher_is_better(metric, v) for j, v in row.items()} for k, row in raw.items()}
        if stage in scores:
            summary = transfer_summary(scores, own, stage)
            average = summary.pop("acc")  # A_k, back in the metric's own units (a mean loss for the loss)
            out[metric] = {"average": higher_is_better(metric, average) if average is not None else None, **summary}
    return out


@dataclass
class StageEvaluation(RoundObserver):
    """Scores the global state on every slice after each stage and logs the matrix's rows and the forgetting."""

    evaluator: Evaluator  # on the test examples of the stream's slices, each labelled with its slice as ``client``
    stream: Stream
    log: MetricsLog
    console: RunConsole
    at_start: bool = True

    def on_start(self, state: TensorDict, start_round: int) -> None:
        if start_round == 0 and self.at_start:
            self.evaluate(state, 0, 0)

    def on_round(self, record: RoundRecord) -> None:
        stage = self.stream.stage_ending_at(record.round)
        if stage is not None:
            self.evaluate(record.state, record.round, stage.index)

    def evaluate(self, state: TensorDict, round_num: int, stage: int) -> None:
        """Score ``state`` on each slice, log the row of ``stage`` and, after a training stage, the summary."""
        result = self.evaluator.evaluate(state, round_num, f"stage {stage}: every slice")
        order = {s: i for i, s in enumerate(self.stream.slices)}
        for entry in sorted((e for e in result.records if e["split"] != GLOBAL_SPLIT), key=lambda e: order.get(e["client"], len(order))):
            row = {k: v for k, v in entry.items() if k not in ("split", "client")}
            self.log.append({**row, "split": SLICE_SPLIT, "stage": stage, "slice": entry["client"]})
        if stage == 0:
            return
        own = own_stages(self.stream)
        parts = []
        for metric, summary in summaries(self.log.read(), own, stage).items():
            self.log.append({"round": round_num, "split": SUMMARY_SPLIT, "stage": stage, "metric": metric, **summary})
            shown = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if v is not None)
            parts.append(f"{metric}: {shown}")
        self.console.print(f"stage {stage} (round {round_num}), every slice: " + "; ".join(parts))


def slice_evaluator(evaluator: Evaluator, slice_of: Any) -> Evaluator:
    """``evaluator`` on its test examples of a slice, each labelled with the slice (``slice_of(example)``; None:
    left out), without generation."""
    test = [dataclasses.replace(ex, client=s, in_global=True) for ex in evaluator.test if (s := slice_of(ex)) is not None]
    config = evaluator.config.model_copy(update={"generate": False})
    return dataclasses.replace(evaluator, test=test, config=config)
