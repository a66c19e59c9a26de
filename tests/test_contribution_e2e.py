"""Contribution scores end to end on the tiny model: a run with every method and contribution sampling writes the
scores into metrics.jsonl, report.md and a plot; `fedlm contribution RUN_DIR` prints the table; a run without a
validation set is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config, write_config

from fedlm.cli import app

CONTRIBUTION = {"methods": ["gtg", "loo", "exact"], "validation": "embedded:wordnet_defs/test", "validation_examples": 4, "batch_size": 4}


@pytest.mark.usefixtures("one_torch_thread")
def test_a_run_scores_every_round_and_samples_by_contribution(tmp_path: Path, runner) -> None:
    out = tmp_path / "run"
    config = tiny_config(
        out,
        federation={"rounds": 2, "clients_per_round": 3, "local_steps": 2, "batch_size": 4, "lr": 0.003, "sampling": "contribution"},
        eval={"max_examples": 8, "batch_size": 8, "generate": False, "at_start": False},
        contribution=CONTRIBUTION,
    )
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["split"] == "aggregate"]
    assert len(rounds) == 2
    cumulative: dict[str, float] = {}
    for r in rounds:
        entry = r["contribution"]
        assert entry["primary"] == "gtg" and entry["validation_examples"] == 4
        exact, loo, gtg = (entry["methods"][m] for m in ("exact", "loo", "gtg"))
        assert set(exact["scores"]) == set(r["clients"]) and exact["coalitions"] == 8 and loo["coalitions"] == 5
        assert exact["forward_passes"] == 8 and entry["coalitions_priced"] == 8  # 4 examples: one batch per coalition
        # exact Shapley is efficient: the scores share the round's change of validation utility
        assert sum(exact["scores"].values()) == pytest.approx(entry["utility_round"] - entry["utility_start"], abs=1e-5)
        for client, score in gtg["scores"].items():
            cumulative[client] = cumulative.get(client, 0.0) + score
        assert gtg["cumulative"] == pytest.approx({c: cumulative.get(c, 0.0) for c in gtg["cumulative"]})
    assert len(rounds[-1]["contribution"]["methods"]["gtg"]["cumulative"]) == 8  # every client, 0 before it joins
    report = (out / "report.md").read_text()
    assert "## Contribution" in report and "plots/contribution.png" in report and (out / "plots" / "contribution.png").is_file()

    table = runner.invoke(app, ["contribution", str(out)])
    assert table.exit_code == 0, table.output
    assert "gtg rank" in table.output and "forward passes / round" in table.output
    assert all(c in table.output for c in rounds[0]["clients"])


def test_scores_without_a_validation_set_are_one_line_error(tmp_path: Path, runner) -> None:
    config = tiny_config(tmp_path / "run", contribution={"methods": ["gtg"]})
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "`contribution.validation` is required" in errors[0], result.output


def test_the_table_of_a_run_without_scores_is_refused(tmp_path: Path, runner) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "split": "aggregate", "client": None}) + "\n")
    result = runner.invoke(app, ["contribution", str(tmp_path)])
    assert result.exit_code == 2 and "has no contribution scores" in result.output
