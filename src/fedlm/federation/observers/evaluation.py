"""Evaluation of the global model: at the start (``eval.at_start``), every ``eval.every`` rounds and after the last;
its records in ``metrics.jsonl``, its predictions in ``predictions/round_NNNN.jsonl``, and the probes' records (an
attack's success on its own test prompts)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedlm.config.schema import EvalConfig
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.update import TensorDict
from fedlm.evaluation.evaluator import Evaluator
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import RunDir

_SHOWN = ("loss", "perplexity", "rouge_l", "exact_match", "mc_accuracy", "preference_accuracy", "reward_margin")


class Probe(Protocol):
    """An extra evaluation run with every evaluation (e.g. a backdoor's attack success)."""

    def evaluate(self, state: TensorDict, round_num: int) -> list[dict[str, Any]]:
        """``metrics.jsonl`` records for ``state`` at ``round_num``."""
        ...


@dataclass
class EvaluationObserver(RoundObserver):
    """Evaluates the global state when due."""

    evaluator: Evaluator
    settings: EvalConfig
    rounds: int
    run_dir: RunDir
    log: MetricsLog
    console: RunConsole
    probes: list[Probe] = field(default_factory=list)

    def on_start(self, state: TensorDict, start_round: int) -> None:
        if start_round == 0 and self.settings.at_start:
            self.evaluate(state, 0)

    def on_round(self, record: RoundRecord) -> None:
        every = self.settings.every
        if record.round == self.rounds or (every > 0 and record.round % every == 0):
            self.evaluate(record.state, record.round)

    def evaluate(self, state: TensorDict, round_num: int) -> None:
        """Evaluate ``state``, log its records and save the predictions of this round."""
        result = self.evaluator.evaluate(state, round_num, f"federated round {round_num}")
        for entry in result.records:
            self.log.append(entry)
        self.run_dir.predictions.mkdir(parents=True, exist_ok=True)
        path = self.run_dir.predictions / f"round_{round_num:04d}.jsonl"
        path.write_text("".join(json.dumps(row, default=str) + "\n" for row in result.predictions))
        for probe in self.probes:
            for entry in probe.evaluate(state, round_num):
                self.log.append(entry)
        glob = result.records[0]
        shown = ", ".join(f"{k} {glob[k]:.4f}" for k in _SHOWN if k in glob)
        self.console.print(f"round {round_num}: global test {shown}")
