"""Harness accuracy on fedlm's shipped task (``wordnet_mc``, lm-evaluation-harness) for the four models of
``fedlm compare`` on one config: base, local-only (each client alone, and their mean), centralized and federated,
with 95% confidence intervals (percentile bootstrap over the task's documents, 10,000 resamples, seed 0) and the time
one harness evaluation adds.

The arms are trained exactly as ``fedlm compare`` trains them (same steps, same lr schedule, same seeds). Run
``python benchmarks/evaluation.py [--config examples/quickstart.yaml] [--limit N] [--write-results]`` (under the
shared lock on a small machine); smoke: ``--set model.name=tiny-random-llama --set federation.rounds=1 --limit 16``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import QUICKSTART, publish

from fedlm.compare import local_step_counts, train_alone
from fedlm.config.io import load_config
from fedlm.core.update import TensorDict
from fedlm.evaluation.harness import TaskOutcome, include_paths, run_tasks, task_manager
from fedlm.experiment import Session, build_session, run_federated
from fedlm.models.adapters import load_trainable_state
from fedlm.reporting.progress import Progress, RunConsole
from fedlm.reporting.run_dir import RunDir

TASK = "wordnet_mc"
RESAMPLES = 10_000
START, END = "<!-- evaluation:start -->", "<!-- evaluation:end -->"


def bootstrap_ci(scores: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``scores`` (one value per document)."""
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), size=(resamples, len(scores)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def per_document(outcome: TaskOutcome, metric: str) -> np.ndarray:
    """The metric of every document, in document order."""
    if outcome.error is not None:
        raise RuntimeError(f"{outcome.task} failed: {outcome.error}")
    rows = sorted(outcome.samples, key=lambda r: r["doc_id"])
    return np.array([float(r[metric]) for r in rows])


def train_arms(session: Session, out: Path, console: RunConsole) -> dict[str, TensorDict]:
    """The adapter states of every arm: base, each local-only client, centralized, federated."""
    states: dict[str, TensorDict] = {"base": session.initial_state}
    counts = local_step_counts(session.config, session.data.client_names)
    with Progress(console) as progress:
        for client, steps in counts.items():
            if steps:
                states[f"local:{client}"] = train_alone(session, f"local-{client}", session.data.client_train[client], steps, progress)
        states["centralized"] = train_alone(session, "centralized", session.data.union_train(), sum(counts.values()), progress)
    federated = RunDir(out / "federated", replace=True)
    federated.create()
    states["federated"] = run_federated(session, federated, resume=False, console=console)
    return states


def measure(session: Session, states: dict[str, TensorDict], limit: int | None) -> tuple[dict[str, TaskOutcome], float]:
    """The harness's outcome on every arm, and the seconds the task index took to build (once per process)."""
    started = time.perf_counter()
    manager = task_manager(include_paths())
    index_s = time.perf_counter() - started
    outcomes = {}
    for name, state in states.items():
        load_trainable_state(session.model, state)
        outcomes[name] = run_tasks(session.model, session.loaded.tokenizer, [TASK], manager, limit=limit)[0]
        print(f"{name}: {outcomes[name].metrics} ({outcomes[name].seconds:.1f} s)", flush=True)
    return outcomes, index_s


def summarize(outcomes: dict[str, TaskOutcome], index_s: float) -> dict[str, Any]:
    """Accuracy, interval and harness time per arm; local-only as the per-document mean over the clients' models."""
    rows = []
    local = [name for name in outcomes if name.startswith("local:")]
    groups: list[tuple[str, list[str]]] = [("base", ["base"])]
    groups += [("local-only (mean)", local)] if local else []
    groups += [("centralized", ["centralized"]), ("federated", ["federated"])]
    groups += [(f"local-only {name.removeprefix('local:')}", [name]) for name in local]
    for label, names in groups:
        row: dict[str, Any] = {"method": label}
        for metric in ("acc_norm", "acc"):
            scores = np.mean([per_document(outcomes[n], metric) for n in names], axis=0)
            low, high = bootstrap_ci(scores)
            row[metric] = float(scores.mean())
            row[f"{metric}_ci95"] = [low, high]
        row["documents"] = len(per_document(outcomes[names[0]], "acc"))
        row["harness_s"] = sum(outcomes[n].seconds for n in names) / len(names)
        rows.append(row)
    return {"task": TASK, "rows": rows, "task_index_s": index_s}


def markdown(summary: dict[str, Any], config: Any, dtype: str, source: str) -> str:
    """The RESULTS.md block."""
    lines = [
        f"`{TASK}` (lm-evaluation-harness, {summary['rows'][0]['documents']} documents, 4 choices, chance 0.25) on "
        f"`{config.model.name}` ({dtype}, CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); "
        f"arms trained as `fedlm compare` trains them on `{source}`. 95% CI: percentile bootstrap "
        f"over documents ({RESAMPLES:,} resamples).",
        "",
        "| method | acc_norm | 95% CI | acc | 95% CI | harness s / evaluation |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["rows"]:
        an, a = r["acc_norm_ci95"], r["acc_ci95"]
        lines.append(
            f"| {r['method']} | {r['acc_norm']:.3f} | {an[0]:.3f}-{an[1]:.3f} | {r['acc']:.3f} | {a[0]:.3f}-{a[1]:.3f} | {r['harness_s']:.1f} |"
        )
    lines += ["", f"Building the harness's task index (once per process) took {summary['task_index_s']:.1f} s."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=QUICKSTART)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="first N documents of the task (default: all 320)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-evaluation"))
    parser.add_argument("--write-results", action="store_true", help="put the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    config = load_config(args.config, [*args.overrides, f"output_dir={args.out}"])
    console = RunConsole()
    session = build_session(config, console)
    states = train_arms(session, args.out, console)
    outcomes, index_s = measure(session, states, args.limit)
    summary = summarize(outcomes, index_s)
    dtype = str(session.loaded.dtype).removeprefix("torch.")
    publish(
        args.out,
        summary,
        markdown(summary, config, dtype, " ".join([str(args.config), *args.overrides])),
        args.write_results,
        START,
        END,
        "Standard evaluation (`benchmarks/evaluation.py`)",
    )


if __name__ == "__main__":
    main()
