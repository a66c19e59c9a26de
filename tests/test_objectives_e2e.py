"""End to end through the CLI on the tiny model: `objective: clm` on embedded:wordnet_text and `objective: dpo` on
embedded:wordnet_prefs write their own metrics into the global and per-client test records; bad data is one error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config, write_config

from fedlm.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_clm_run_reports_perplexity_on_held_out_blocks(tmp_path: Path, runner) -> None:
    out = tmp_path / "clm"
    config = tiny_config(
        out,
        objective={"name": "clm", "block_size": 96},
        data={"train": "embedded:wordnet_text", "max_train_examples": 24, "max_length": 128},
        eval={"max_examples": 6, "batch_size": 8},
    )
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 0, result.output
    records = _records(out)
    glob = [r for r in records if r["split"] == "global_test"]
    assert [r["round"] for r in glob] == [0, 1, 2]
    assert all(r["perplexity"] > 1.0 and "rouge_l" not in r for r in glob)
    assert glob[-1]["loss"] < glob[0]["loss"]  # training on domain text lowers held-out loss
    assert any(r["split"].startswith("client_") and "perplexity" in r for r in records)
    train = [r for r in records if r["split"] == "train"]
    assert train and all(r["tokens"] == 2 * 4 * 96 for r in train)  # local_steps x batch_size full blocks, no padding
    row = json.loads((out / "predictions" / "round_0002.jsonl").read_text().splitlines()[0])
    assert row["num_tokens"] == 95 and row["prediction"] is None
    assert yaml.safe_load((out / "config.yaml").read_text())["objective"] == {"name": "clm", "block_size": 96}  # resolved config keeps it


def test_dpo_run_reports_preference_accuracy_and_reward_margin(tmp_path: Path, runner) -> None:
    out = tmp_path / "dpo"
    config = tiny_config(
        out,
        objective={"name": "dpo", "beta": 0.1},
        data={"train": "embedded:wordnet_prefs", "max_train_examples": 48, "max_length": 128},
        federation={"rounds": 2, "clients_per_round": 3, "local_steps": 2, "batch_size": 4, "lr": 0.01},
        eval={"max_examples": 16, "batch_size": 8},
    )
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 0, result.output
    records = _records(out)
    glob = [r for r in records if r["split"] == "global_test"]
    assert [r["round"] for r in glob] == [0, 1, 2]
    for r in glob:
        assert {"preference_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "loss"} <= set(r)
        assert 0.0 <= r["preference_accuracy"] <= 1.0 and "perplexity" not in r
    # round 0: the adapter is zero, so policy = reference: every reward is 0 and the loss is log 2
    assert glob[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6) and glob[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert glob[-1]["reward_margin"] != pytest.approx(0.0, abs=1e-6)
    assert any(r["split"].startswith("client_") and "preference_accuracy" in r for r in records)
    train = [r for r in records if r["split"] == "train"]
    assert train and all("reward_margin" in r and "preference_accuracy" in r for r in train)
    assert "preference_accuracy" in (out / "report.md").read_text()


def test_dpo_on_alpaca_data_fails_with_the_columns(tmp_path: Path, runner) -> None:
    config = tiny_config(tmp_path / "bad", objective="dpo", data={"max_train_examples": 16})
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code != 0
    assert "objective: dpo" in result.output and "`rejected`" in result.output and "`instruction`" in result.output
    assert "Traceback" not in result.output
