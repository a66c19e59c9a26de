"""Slow: every inference mix from the CLI on the real model (SmolLM2-135M-Instruct), personal adapters as fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from inference_fixtures import add_clients, tiny_run
from typer.testing import CliRunner

from fedlm.cli import app

pytestmark = pytest.mark.slow

MIXES = [
    ["--mix", "global"],
    ["--client", "alice", "--mix", "local"],
    ["--client", "alice", "--mix", "adapter", "--weight", "auto"],
    ["--client", "bob", "--mix", "logits", "--weight", "0.5"],
    ["--client", "bob", "--mix", "logits", "--combine", "product", "--weight", "auto", "--max-weight", "0.6"],
]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("realrun")
    run_dir = tiny_run(
        root,
        CliRunner(),
        model={"name": "smollm2-135m-instruct"},
        peft={"r": 8, "alpha": 16, "dropout": 0.0},
        data={"max_train_examples": 64, "max_length": 64},
        federation={"rounds": 1, "clients_per_round": 2, "local_steps": 1, "batch_size": 2, "lr": 0.002},
    )
    add_clients(run_dir, "dual", scale=0.01)  # a small change: the real model still answers in words
    return run_dir


@pytest.mark.parametrize("flags", MIXES)
def test_every_mix_generates_on_the_real_model(real_run: Path, tmp_path: Path, flags: list[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is a river?"}) + "\n" + json.dumps({"prompt": "Name a colour."}) + "\n")
    out = tmp_path / "a.jsonl"
    result = CliRunner().invoke(app, ["generate", str(real_run), "--prompts", str(prompts), "--out", str(out), "--max-tokens", "8", *flags])
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == 2 and all(a["answer"].strip() for a in answers)


def test_chat_on_the_real_model(real_run: Path) -> None:
    script = "What is a river?\n/client alice\n/mix adapter\nAnd a lake?\n/quit\n"
    result = CliRunner().invoke(app, ["chat", str(real_run), "--max-tokens", "8"], input=script)
    assert result.exit_code == 0, result.output
    assert "now: client alice, mix adapter" in result.output
