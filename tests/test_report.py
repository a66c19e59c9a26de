"""Tests for fedlm.reporting: MetricsLog, plots and the markdown report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.plots import plot_metrics
from fedlm.reporting.report import markdown_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLIENTS = ("noun.animal", "noun.food")


# --------------------------------------------------------------- MetricsLog


def _strict_loads(line: str) -> Any:
    def reject(const: str) -> None:
        raise AssertionError(f"non-strict JSON constant {const} in {line!r}")

    return json.loads(line, parse_constant=reject)


def test_metrics_log_round_trip(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "sub" / "metrics.jsonl")
    assert log.read() == []
    recs = [
        {"round": 0, "split": "global_test", "client": None, "loss": 2.5, "num_examples": 96},
        {"round": 1, "split": "aggregate", "client": None, "num_updates": 4, "rejected": ["x"]},
    ]
    for rec in recs:
        log.append(rec)
    assert log.read() == recs
    lines = log.path.read_text().splitlines()
    assert len(lines) == 2
    assert [_strict_loads(ln) for ln in lines] == recs


def test_metrics_log_nan_and_inf_become_null(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"round": 0, "loss": float("nan"), "perplexity": float("inf"), "x": [-math.inf]})
    line = log.path.read_text().strip()
    assert _strict_loads(line) == {"round": 0, "loss": None, "perplexity": None, "x": [None]}
    assert log.read() == [{"round": 0, "loss": None, "perplexity": None, "x": [None]}]


def test_metrics_log_fsyncs_each_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"round": 0})
    log.append({"round": 1})
    assert len(calls) == 2


def test_metrics_log_ignores_torn_last_line(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"round": 0})
    with open(log.path, "a") as fh:
        fh.write('{"round": 1, "lo')
    assert log.read() == [{"round": 0}]


def test_truncate_after_round(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    rounds = [0, 1, 1, 2, 3, 2]
    for i, r in enumerate(rounds):
        log.append({"round": r, "i": i})
    log.append({"split": "meta"})  # no round: kept
    log.truncate_after_round(1)
    assert log.read() == [
        {"round": 0, "i": 0},
        {"round": 1, "i": 1},
        {"round": 1, "i": 2},
        {"split": "meta"},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp left
    log.append({"round": 2, "i": 99})
    assert [r.get("i") for r in log.read()] == [0, 1, 2, None, 99]
    log.truncate_after_round(-1)
    assert log.read() == [{"split": "meta"}]


def test_truncate_missing_file_is_noop(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.truncate_after_round(3)
    assert not log.path.exists()


# ------------------------------------------------------------- report/plots


def _synthetic_records() -> list[dict[str, Any]]:
    """3 rounds (0 = before training) x 2 clients."""
    recs: list[dict[str, Any]] = []
    for r in range(3):
        recs.append(
            {
                "round": r,
                "split": "global_test",
                "client": None,
                "loss": 2.123456 - 0.5 * r,
                "perplexity": math.exp(2.123456 - 0.5 * r),
                "exact_match": 0.1 * r,
                "rouge_l": 0.2 + 0.05 * r,
                "num_examples": 96,
            }
        )
        for k, c in enumerate(CLIENTS):
            recs.append(
                {
                    "round": r,
                    "split": f"client_{c}_test",
                    "client": c,
                    "loss": 2.0 - 0.3 * r - 0.1 * k,
                    "perplexity": 7.0 - r,
                    "rouge_l": 0.3 + 0.01 * r + 0.1 * k,
                }
            )
            if r > 0:
                recs.append(
                    {
                        "round": r,
                        "split": "train",
                        "client": c,
                        "loss": 1.9 + 0.1 * k - 0.2 * r,
                        "num_examples": 500,
                        "steps": 10,
                        "lr": 0.0002,
                    }
                )
        if r > 0:
            recs.append({"round": r, "split": "aggregate", "client": None, "num_updates": 2, "rejected": []})
    return recs


def test_write_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    path = write_report(
        run_dir,
        _synthetic_records(),
        title="Demo run",
        config_summary={"model": "tiny", "lr": 0.0002, "rounds": 2},
        extra_sections=[("Notes", "Some *notes*.")],
    )
    assert path == run_dir / "report.md"
    text = path.read_text()
    assert text.startswith("# Demo run\n")
    assert "| key | value |" in text
    assert "| lr | 0.0002 |" in text and "| rounds | 2 |" in text
    # Global test table: all four metrics, one row per round, 4 significant digits.
    assert "| round | loss | perplexity | exact_match | rouge_l |" in text
    assert "| 0 | 2.123 | 8.36 | 0 | 0.2 |" in text
    assert "| 1 | 1.623 | 5.071 | 0.1 | 0.25 |" in text
    assert "| 2 | 1.123 | 3.075 | 0.2 | 0.3 |" in text
    # Final round's per-client table (round 2 values; no exact_match for clients).
    assert "Per-client test metrics (round 2)" in text
    assert "| client | loss | perplexity | rouge_l |" in text
    assert "| noun.animal | 1.4 | 5 | 0.32 |" in text
    assert "| noun.food | 1.3 | 5 | 0.42 |" in text
    assert "| noun.animal | 2 |" not in text  # round-0 client row not in the table
    # Train loss: mean over the two clients.
    assert "| 1 | 1.75 | 2 |" in text
    assert "| 2 | 1.55 | 2 |" in text
    for name in ("loss", "perplexity", "exact_match", "rouge_l"):
        assert f"![{name}](plots/{name}.png)" in text
        png = run_dir / "plots" / f"{name}.png"
        assert png.stat().st_size > 0
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert "## Notes\n\nSome *notes*." in text
    # Section order: config, global, per-client, train, plots, extra.
    marks = ["## Configuration", "## Global test", "## Per-client", "## Rounds", "## Plots", "## Notes"]
    positions = [text.index(m) for m in marks]
    assert positions == sorted(positions)


def test_plot_metrics_skips_missing_metrics(tmp_path: Path) -> None:
    recs = [r for r in _synthetic_records() if r["split"] != "train"]
    for r in recs:
        r.pop("exact_match", None)
        if r["split"] == "global_test":
            r.pop("perplexity")
    paths = plot_metrics(recs, tmp_path / "plots")
    assert [p.name for p in paths] == ["loss.png", "rouge_l.png"]
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert not (tmp_path / "plots" / "perplexity.png").exists()
    assert plot_metrics([], tmp_path / "empty") == []


def test_plot_metrics_many_clients(tmp_path: Path) -> None:
    recs = [{"round": r, "split": f"client_c{k}_test", "client": None, "rouge_l": 0.1 * k + r} for r in range(2) for k in range(10)]
    recs += [{"round": r, "split": "global_test", "rouge_l": 0.5, "loss": 1.0} for r in range(2)]
    names = [p.name for p in plot_metrics(recs, tmp_path)]
    assert names == ["loss.png", "rouge_l.png"]


def test_markdown_table_formatting() -> None:
    rows = [
        {"name": "a", "x": 3.14159265, "n": 7, "y": None},
        {"name": "b|c", "x": 123456.0, "n": 0, "y": 0.000123456},
        {"name": "d", "x": float("nan"), "n": True},
    ]
    table = markdown_table(rows, ["name", "x", "n", "y"])
    assert table.splitlines() == [
        "| name | x | n | y |",
        "| --- | --- | --- | --- |",
        "| a | 3.142 | 7 | – |",
        "| b\\|c | 1.235e+05 | 0 | 0.0001235 |",
        "| d | nan | True | – |",
    ]
    assert markdown_table([], ["a"]).splitlines() == ["| a |", "| --- |"]
    with pytest.raises(ValueError):
        markdown_table(rows, [])
