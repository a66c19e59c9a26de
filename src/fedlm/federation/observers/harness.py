"""``eval.harness``: lm-evaluation-harness tasks on the global model during training, so that the curves show
benchmark accuracy per round. Runs when the evaluation does (round 0 with ``eval.at_start``, every
``eval.harness.every`` rounds, after the last); one ``split: harness`` record per task and round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.config.schema import HarnessConfig
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.update import TensorDict
from fedlm.evaluation.harness import TaskOutcome, check_task_names, include_paths, run_tasks, task_manager
from fedlm.models.adapters import load_trainable_state
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

HARNESS_SPLIT = "harness"


@dataclass
class HarnessObserver(RoundObserver):
    """Runs the configured harness tasks on the global state when due and logs their metrics."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    settings: HarnessConfig
    at_start: bool
    rounds: int
    log: MetricsLog
    console: RunConsole
    manager: TaskManager | None = None

    def __post_init__(self) -> None:
        """Check the include paths and task names now, before any round trains."""
        self.manager = task_manager(include_paths(self.settings.include_path))
        check_task_names(self.settings.tasks, self.manager, "eval.harness.tasks")

    def on_start(self, state: TensorDict, start_round: int) -> None:
        if start_round == 0 and self.at_start:
            self.evaluate(state, 0)

    def on_round(self, record: RoundRecord) -> None:
        every = self.settings.every
        if record.round == self.rounds or (every > 0 and record.round % every == 0):
            self.evaluate(record.state, record.round)

    def evaluate(self, state: TensorDict, round_num: int) -> list[TaskOutcome]:
        """Run every task on ``state``; log one record per task (a failed task logs its error and the rest run)."""
        if self.manager is None:
            raise RuntimeError("HarnessObserver used before its task index was built")
        load_trainable_state(self.model, state)
        s = self.settings
        self.console.print(f"round {round_num}: harness {', '.join(s.tasks)} on the federated model")
        outcomes = run_tasks(
            self.model,
            self.tokenizer,
            s.tasks,
            self.manager,
            limit=s.limit,
            batch_size=s.batch_size,
            num_fewshot=s.num_fewshot,
            keep_samples=False,
            allow_code_execution=s.allow_code_execution,
        )
        for outcome in outcomes:
            self.log.append(harness_record(outcome, round_num))
            head = outcome.headline()
            shown = f"{head[0]} {head[1]:.4f}" if head else f"failed: {outcome.error}"
            self.console.print(f"round {round_num}: harness {outcome.task} {shown} ({outcome.seconds:.1f} s)")
        return outcomes


def harness_record(outcome: TaskOutcome, round_num: int) -> dict[str, Any]:
    """The ``metrics.jsonl`` record of one task at one round (``metric``: the one tables and plots show)."""
    head = outcome.headline()
    record: dict[str, Any] = {
        "round": round_num,
        "split": HARNESS_SPLIT,
        "client": None,
        "task": outcome.task,
        "metric": head[0] if head else None,
        **outcome.metrics,
        "num_examples": outcome.num_samples,
        "harness_s": round(outcome.seconds, 3),
    }
    if outcome.error is not None:
        record["error"] = outcome.error
    return record
