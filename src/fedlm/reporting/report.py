"""Markdown report (``report.md``) of a federated run.

Built from the records of ``metrics.jsonl``: configuration summary, global
test metrics per round, the final round's per-client test metrics, the mean
train loss per round, the plots, and optional extra sections.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlm.reporting.harness_report import harness_section
from fedlm.reporting.plots import (
    GLOBAL_TEST,
    client_name,
    finite,
    is_client_test,
    mean_train_loss,
    plot_metrics,
)
from fedlm.reporting.tables import format_value, markdown_table

__all__ = ["EVAL_METRICS", "format_value", "markdown_table", "write_report"]

# Evaluation metric columns, in table order (only those with data are shown).
EVAL_METRICS: tuple[str, ...] = (
    "loss",
    "perplexity",
    "exact_match",
    "rouge_l",
    "mc_accuracy",
    "preference_accuracy",
    "reward_margin",
    "likelihood_accuracy",
)


def _round(record: Mapping[str, Any]) -> int | None:
    """The record's integer round, or None."""
    r = record.get("round")
    return int(r) if isinstance(r, numbers.Integral) and not isinstance(r, bool) else None


def _present(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[str]:
    """The metrics that have at least one value in ``rows``, in given order."""
    return [m for m in metrics if any(row.get(m) is not None for row in rows)]


def _metric_row(record: Mapping[str, Any], **lead: Any) -> dict[str, Any]:
    """A table row: ``lead`` columns plus the finite evaluation metrics."""
    return {**lead, **{m: finite(record.get(m)) for m in EVAL_METRICS}}


def _global_section(records: Sequence[Mapping[str, Any]]) -> str:
    """Table of global_test metrics per evaluated round."""
    by_round: dict[int, Mapping[str, Any]] = {}
    for rec in records:
        rnd = _round(rec)
        if rec.get("split") == GLOBAL_TEST and rnd is not None:
            by_round[rnd] = rec  # last record of a round wins
    rows = [_metric_row(by_round[r], round=r) for r in sorted(by_round)]
    cols = _present(rows, EVAL_METRICS)
    if not rows or not cols:
        return "## Global test metrics\n\n_No global_test evaluations recorded._"
    return "## Global test metrics\n\n" + markdown_table(rows, ["round", *cols])


def _client_section(records: Sequence[Mapping[str, Any]]) -> str:
    """Table of the final round's per-client test metrics."""
    tests = [r for r in records if is_client_test(r) and _round(r) is not None]
    if not tests:
        return "## Per-client test metrics\n\n_No per-client test evaluations recorded._"
    last = max(n for r in tests if (n := _round(r)) is not None)
    by_client = {client_name(r): r for r in tests if _round(r) == last}
    rows = [_metric_row(by_client[c], client=c) for c in sorted(by_client)]
    cols = _present(rows, EVAL_METRICS)
    table = markdown_table(rows, ["client", *cols])
    return f"## Per-client test metrics (round {last})\n\n{table}"


def _train_section(records: Sequence[Mapping[str, Any]]) -> str:
    """Table per round: mean client train loss, clients, bytes on the wire and the aggregator's own numbers."""
    means = mean_train_loss(records)
    if not means:
        return "## Train loss\n\n_No train records._"
    rounds = {_round(r): r for r in records if r.get("split") == "aggregate"}
    rows = []
    for rnd, (mean, count) in means.items():
        agg = rounds.get(rnd, {})
        row: dict[str, Any] = {"round": rnd, "mean_train_loss": mean, "clients": count}
        if "download_bytes" in agg:
            row["download_MiB"] = agg["download_bytes"] / 2**20
            row["upload_MiB"] = agg["upload_bytes"] / 2**20
        for key, value in (agg.get("aggregation") or {}).items():
            if key == "excluded":
                row[key] = ", ".join(value)
            elif key != "num_updates" and not isinstance(value, dict):
                row[key] = value
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return "## Rounds (train loss is the mean over clients)\n\n" + markdown_table(rows, columns)


AUDIT_SCORES: tuple[str, ...] = ("loss", "zlib", "min_k")


def _audit_section(run_dir: Path) -> str | None:
    """The privacy audit of ``run_dir/audit.json`` (``fedlm audit``) beside the epsilon spent, or None without one:
    membership inference per model and score (Carlini et al. 2022 read TPR at low FPR), canary exposure in bits
    (Carlini et al. 2019)."""
    path = run_dir / "audit.json"
    if not path.is_file():
        return None
    try:
        audit = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"## Privacy audit\n\n_audit.json unreadable: {exc}_"
    eps = audit.get("epsilon")
    dp = f"epsilon {format_value(eps)} at delta {format_value(audit.get('delta'))}" if eps is not None else "no differential privacy (epsilon = inf)"
    models: list[tuple[str, Mapping[str, Any]]] = [("global", audit)]
    client = audit.get("client_model")
    if isinstance(client, Mapping):
        models.append((f"client {client.get('client')} (local, round {client.get('round')})", client))
    mia: list[dict[str, Any]] = []
    canaries: list[dict[str, Any]] = []
    for name, part in models:
        for score in AUDIT_SCORES:
            r = part.get(score) or {}
            mia.append(
                {
                    "model": name,
                    "score": score,
                    "AUC": r.get("auc"),
                    "TPR@1%FPR": r.get("tpr_at_fpr_0.01"),
                    "TPR@0.1%FPR": r.get("tpr_at_fpr_0.001"),
                    "members": r.get("n_members"),
                    "non-members": r.get("n_nonmembers"),
                }
            )
        c = part.get("canaries")
        if isinstance(c, Mapping):
            canaries.append(
                {
                    "model": name,
                    "canaries": c.get("canaries"),
                    "repetitions": c.get("repetitions"),
                    "mean exposure (bits)": c.get("mean_exposure_bits"),
                    "max exposure (bits)": c.get("max_exposure_bits"),
                    "controls' mean (bits)": (c.get("control") or {}).get("mean_exposure_bits"),
                    "max possible (bits)": c.get("max_possible_bits"),
                }
            )
    body = [
        f"Round {audit.get('round')}: {dp}.",
        "Membership inference (members: training examples; non-members: test examples; AUC 0.5 is chance):",
        markdown_table(mia, list(mia[0])),
    ]
    if len(models) > 1:
        body.append("A client's local model never leaves the client: client-level DP covers the global model, not this one.")
    if canaries:
        body += [
            "Canary exposure (planted secrets ranked among never-planted references; controls were never planted):",
            markdown_table(canaries, list(canaries[0])),
        ]
    return "## Privacy audit\n\n" + "\n\n".join(body)


def _plots_section(run_dir: Path, records: list[dict]) -> str:
    """Write the plots into ``run_dir/plots`` and return their embeds."""
    paths = plot_metrics(records, run_dir / "plots")
    if not paths:
        return "## Plots\n\n_No data to plot._"
    embeds = [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" for p in paths]
    return "## Plots\n\n" + "\n\n".join(embeds)


def write_report(
    run_dir: Path,
    records: list[dict],
    *,
    title: str,
    config_summary: Mapping[str, Any],
    extra_sections: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write ``run_dir/report.md`` (and the plots under ``run_dir/plots/``).

    Args:
        run_dir: The run directory; created if missing.
        records: Metrics records (as read from ``metrics.jsonl``).
        title: Report title (level-1 heading).
        config_summary: Key/value pairs shown in the configuration table.
        extra_sections: ``(heading, markdown body)`` pairs appended at the end.

    Returns:
        Path of the written ``report.md``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_rows = [{"key": k, "value": v} for k, v in config_summary.items()]
    config = markdown_table(config_rows, ["key", "value"]) if config_rows else "_No configuration given._"
    sections = [
        f"# {title}",
        f"## Configuration\n\n{config}",
        _global_section(records),
        _client_section(records),
        _train_section(records),
        *filter(None, [_audit_section(run_dir), harness_section(run_dir, records)]),
        _plots_section(run_dir, records),
        *(f"## {heading}\n\n{body.strip()}" for heading, body in extra_sections),
    ]
    path = run_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path
