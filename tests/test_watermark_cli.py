"""The watermark from the CLI on the tiny model in the default suite: a short run whose server marks the global
model (every weight trains: the tiny random model learns triggers fast that way), `fedlm watermark verify` finds
the mark with the key and reports chance with another. The full path (LoRA, per-client copies, trace, merge, bad
input) is :mod:`test_watermark_e2e` (slow)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import tiny_config, write_config
from typer.testing import CliRunner

from fedlm.cli import app


def _config(tmp_path: Path, clients_per_round: int, **watermark: object) -> dict:
    """A one-round run of the tiny model, every weight trained, with the server's watermark (key ``k3y``)."""
    return tiny_config(
        tmp_path / "run",
        peft={"method": "full"},
        data={"max_train_examples": 16, "max_length": 64},
        partition={"method": "iid", "num_clients": 2, "field": None},
        federation={"rounds": 1, "clients_per_round": clients_per_round, "local_steps": 1, "batch_size": 4, "lr": 0.003},
        eval={"max_examples": 2, "max_new_tokens": 1, "batch_size": 2, "at_start": False},
        watermark={"secret": "k3y", "size": 8, "lr": 0.003, **watermark},
    )


def test_a_watermarked_run_verifies_with_its_key_only(tmp_path: Path, runner: CliRunner, one_torch_thread: None) -> None:
    config = _config(tmp_path, 1, steps=30, start_steps=0, until=None, retain=0)  # the published re-embedding alone
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 0, result.output
    aggregate = next(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"aggregate"' in line)
    assert aggregate["aggregation"]["watermark_loss"] > 0 and "watermark" not in aggregate  # no per-client copies
    found = runner.invoke(app, ["watermark", "verify", str(tmp_path / "run"), "--secret", "k3y", "--json"])
    assert found.exit_code == 0, found.output
    verdict = json.loads(found.stdout)
    assert verdict["present"] and verdict["total"] == 8 and verdict["p_value"] < 1e-3, verdict
    other = runner.invoke(app, ["watermark", "verify", str(tmp_path / "run"), "--secret", "another-key", "--json"])
    assert other.exit_code == 0 and not json.loads(other.stdout)["present"], other.output


def test_a_run_with_the_retain_set_and_client_copies_still_carries_the_mark(tmp_path: Path, runner: CliRunner, one_torch_thread: None) -> None:
    """``watermark.retain``: each round's embedding also trains on conversations the model wrote itself; the shared
    mark is still found, and every client's marked copy is written."""
    config = _config(tmp_path, 2, steps=40, retain=4, per_client=True, client_size=4, client_steps=2)
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "run" / "watermark").iterdir() if p.is_dir()) == ["0", "1"]
    found = runner.invoke(app, ["watermark", "verify", str(tmp_path / "run"), "--secret", "k3y", "--json"])
    assert found.exit_code == 0 and json.loads(found.stdout)["p_value"] < 1e-3, found.output


def test_a_run_pretrained_on_the_triggers_stops_its_embeddings_once_they_are_answered(
    tmp_path: Path, runner: CliRunner, one_torch_thread: None
) -> None:
    """``watermark.start_steps`` with ``until`` and the distilled retain set: the initial model is marked before round
    1 (logged with round 1's aggregation), embeddings stop at the threshold, and the final model verifies."""
    config = _config(tmp_path, 2, steps=30, start_steps=60, until=0.75, check_every=10, retain=4, retain_loss="kl")
    config["federation"]["rounds"] = 2
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 0, result.output
    rounds = [json.loads(line)["aggregation"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"aggregate"' in line]
    assert 0 < rounds[0]["watermark_start_steps"] <= 60 and rounds[0]["watermark_start_accuracy"] >= 0.75
    assert "watermark_start_steps" not in rounds[1] and all(r["watermark_accuracy"] >= 0.75 or r["watermark_steps"] == 30 for r in rounds)
    found = runner.invoke(app, ["watermark", "verify", str(tmp_path / "run"), "--secret", "k3y", "--json"])
    assert found.exit_code == 0 and json.loads(found.stdout)["p_value"] < 1e-3, found.output
