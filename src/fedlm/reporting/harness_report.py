"""The standard-benchmark part of ``report.md``: every model and task of ``RUN_DIR/eval/*.json`` (``fedlm eval``) in
one table, and the benchmark accuracy per round of ``eval.harness`` (``harness`` records of ``metrics.jsonl``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlm.reporting.tables import format_value, markdown_table

HEADING = "## Standard benchmarks (lm-evaluation-harness)"
HARNESS_SPLIT = "harness"
#: Metrics shown first when a task reports them (the length-normalised accuracy of multiple-choice tasks first).
HEADLINE = ("acc_norm", "acc", "exact_match", "pass@1", "f1", "mcc", "word_perplexity")


def headline(metrics: Mapping[str, Any]) -> str | None:
    """The metric a table shows for a task: the first of :data:`HEADLINE` present, else the first numeric one."""
    for name in HEADLINE:
        if isinstance(metrics.get(name), (int, float)):
            return name
    return next((k for k, v in metrics.items() if isinstance(v, (int, float)) and not k.endswith("_stderr")), None)


def _model_order(label: str) -> tuple[int, str]:
    """Base models first, then the global model, then clients' personal models."""
    rank = 0 if label.startswith("base") else 1 if label == "global" else 2
    return rank, label


def harness_table(run_dir: Path) -> str | None:
    """Markdown of every ``eval/<task>.json`` of ``run_dir``: one row per model, one column per task (its headline
    metric +- standard error, documents), or None when nothing was evaluated."""
    files = sorted((run_dir / "eval").glob("*.json"))
    results: dict[str, dict[str, Any]] = {}
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            results[str(data.get("task", path.stem))] = data["models"]
    if not results:
        return None
    labels = sorted({label for models in results.values() for label in models}, key=_model_order)
    rows: list[dict[str, Any]] = []
    columns = ["model"]
    about: dict[str, Mapping[str, Any]] = {}
    for task in results:
        columns.append(task)
    for label in labels:
        row: dict[str, Any] = {"model": label}
        for task, models in results.items():
            entry = models.get(label)
            if entry is None:
                continue
            about.setdefault(label, entry)
            row[task] = _cell(entry)
        rows.append(row)
    notes = [f"- {label}: {_about(entry)}" for label, entry in about.items()]
    return markdown_table(rows, columns) + "\n\n" + "\n".join(notes)


def _cell(entry: Mapping[str, Any]) -> str:
    if entry.get("error"):
        return f"failed: {str(entry['error'])[:80]}"
    metrics = entry.get("metrics") or {}
    name = headline(metrics)
    if name is None:
        return "no metric"
    stderr = metrics.get(f"{name}_stderr")
    spread = f" ± {format_value(stderr)}" if isinstance(stderr, (int, float)) else ""
    return f"{format_value(metrics[name])}{spread} ({name}, n={entry.get('num_samples', '?')})"


def _about(entry: Mapping[str, Any]) -> str:
    parts = [f"model {entry.get('model')}", f"dtype {entry.get('dtype')}", f"device {entry.get('device')}"]
    if entry.get("adapter"):
        parts.append(f"adapter {entry['adapter']}")
    if entry.get("limit"):
        parts.append(f"first {entry['limit']} documents per task")
    parts.append(f"lm-eval {entry.get('lm_eval')}")
    return ", ".join(parts)


def harness_rounds_table(records: Sequence[Mapping[str, Any]]) -> str | None:
    """Benchmark accuracy per round from ``eval.harness`` (``split: harness`` records), or None without any."""
    rows: dict[int, dict[str, Any]] = {}
    for rec in records:
        if rec.get("split") != HARNESS_SPLIT or not isinstance(rec.get("round"), int):
            continue
        name = rec.get("metric")
        value = rec.get("error") and "failed" or (rec.get(name) if isinstance(name, str) else None)
        rows.setdefault(rec["round"], {"round": rec["round"]})[f"{rec.get('task')} ({name})"] = value
    if not rows:
        return None
    columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    return markdown_table([rows[r] for r in sorted(rows)], columns)


def harness_section(run_dir: Path, records: Sequence[Mapping[str, Any]] = ()) -> str | None:
    """The report section: the per-round table (training) and the ``fedlm eval`` table, or None without either."""
    parts = []
    per_round = harness_rounds_table(records)
    if per_round is not None:
        parts.append("Global model per round (`eval.harness`):\n\n" + per_round)
    table = harness_table(run_dir)
    if table is not None:
        parts.append(f"`fedlm eval` (results in {run_dir / 'eval'}/<task>.json):\n\n" + table)
    return HEADING + "\n\n" + "\n\n".join(parts) if parts else None


def update_report(run_dir: Path) -> Path:
    """Put the benchmark section into ``run_dir/report.md`` (replacing an older one; before the plots), or write a
    report holding only it when the folder has none (a base model evaluated outside a run)."""
    path = run_dir / "report.md"
    records = _metrics(run_dir)
    section = harness_section(run_dir, records) or HEADING + "\n\n_No benchmark results._"
    if not path.is_file():
        path.write_text(f"# fedlm eval: {run_dir.name}\n\n{section}\n", encoding="utf-8")
        return path
    text = path.read_text(encoding="utf-8")
    if HEADING in text:
        before, _, rest = text.partition(HEADING)
        after = rest[rest.index("\n## ") :] if "\n## " in rest else "\n"
        text = before + section + "\n" + after
    elif "\n## Plots" in text:
        before, _, rest = text.partition("\n## Plots")
        text = before + "\n" + section + "\n\n## Plots" + rest
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
