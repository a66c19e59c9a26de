"""``fedlm generate`` and ``fedlm chat`` from the command line on the tiny model: every mix, the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from inference_fixtures import add_clients, tiny_run
from typer.testing import CliRunner

from fedlm.cli.main import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clirun")
    plain = tiny_run(root, CliRunner())
    personal = root / "personal"
    shutil.copytree(plain, personal)
    add_clients(personal, "dual")
    prompts = root / "prompts.jsonl"
    lines = [{"prompt": "What is a cat?", "id": 1}, {"messages": [{"role": "user", "content": "Hi"}]}, {"text": "Once upon a time"}]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return {"plain": plain, "personal": personal, "prompts": prompts}


@pytest.mark.parametrize(
    "flags",
    [
        ["--mix", "global"],
        ["--client", "alice", "--mix", "local"],
        ["--client", "alice", "--mix", "adapter", "--weight", "0.3"],
        ["--client", "bob", "--mix", "logits", "--weight", "auto", "--max-weight", "0.7"],
        ["--client", "bob", "--mix", "logits", "--combine", "product"],
    ],
)
def test_generate_every_mix(runner: CliRunner, runs: dict[str, Path], tmp_path: Path, flags: list[str]) -> None:
    out = tmp_path / "answers.jsonl"
    args = ["generate", str(runs["personal"]), "--prompts", str(runs["prompts"]), "--out", str(out), "--max-tokens", "5", *flags]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == 3 and answers[0]["id"] == 1
    assert all(isinstance(a["answer"], str) and a["finish_reason"] in ("stop", "length") for a in answers)
    assert answers[0]["mix"] == flags[flags.index("--mix") + 1]


def test_generate_answers_depend_on_the_mix(runner: CliRunner, runs: dict[str, Path], tmp_path: Path) -> None:
    texts = {}
    for mix in ("global", "local"):
        out = tmp_path / f"{mix}.jsonl"
        args = [
            "generate",
            str(runs["personal"]),
            "--prompts",
            str(runs["prompts"]),
            "--out",
            str(out),
            "--max-tokens",
            "8",
            "--client",
            "alice",
            "--mix",
            mix,
        ]
        assert runner.invoke(app, args).exit_code == 0
        texts[mix] = [json.loads(line)["answer"] for line in out.read_text().splitlines()]
    assert texts["global"] != texts["local"]


def test_refusals(runner: CliRunner, runs: dict[str, Path], tmp_path: Path) -> None:
    base = ["generate", "--prompts", str(runs["prompts"]), "--out", str(tmp_path / "a.jsonl")]
    result = runner.invoke(app, [base[0], str(runs["plain"]), *base[1:], "--client", "alice", "--mix", "local"])
    assert result.exit_code == 2 and "client 'alice'" in result.output and "no personal adapters" in result.output and "--mix global" in result.output
    result = runner.invoke(app, [base[0], str(runs["personal"]), *base[1:], "--client", "carol", "--mix", "local"])
    assert result.exit_code == 2 and "unknown client 'carol'" in result.output and "alice, bob" in result.output
    result = runner.invoke(app, [base[0], str(runs["personal"]), *base[1:], "--client", "alice", "--mix", "blend"])
    assert result.exit_code == 2 and "inference.mix" in result.output
    result = runner.invoke(app, [base[0], str(runs["personal"]), *base[1:], "--client", "alice", "--mix", "adapter", "--weight", "1.5"])
    assert result.exit_code == 2 and "inference.weight" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nothing": 1}\n')
    result = runner.invoke(app, ["generate", str(runs["personal"]), "--prompts", str(bad)])
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": "x" * 1100}) + "\n")
    result = runner.invoke(app, ["generate", str(runs["personal"]), "--prompts", str(long)])
    assert result.exit_code == 2 and "exceeds the model's context of 1024 tokens" in result.output
    result = runner.invoke(app, ["generate", str(tmp_path), "--prompts", str(runs["prompts"])])
    assert result.exit_code == 2 and "no finished fedlm run" in result.output
    result = runner.invoke(app, ["serve", str(runs["personal"]), "--engine", "vllm"])
    assert result.exit_code == 2 and "--engine vllm" in result.output and ("not installed" in result.output or "CUDA" in result.output)


def test_chat_commands_and_history(runner: CliRunner, runs: dict[str, Path]) -> None:
    script = "\n".join(
        [
            "Hello",
            "/client alice",
            "How are you?",
            "/mix logits",
            "/weight auto",
            "And now?",
            "/mix blend",
            "/client carol",
            "/reset",
            "Again",
            "/quit",
            "never read",
        ]
    )
    result = runner.invoke(app, ["chat", str(runs["personal"]), "--max-tokens", "4"], input=script + "\n")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "fedlm chat: global model" in out
    assert "now: client alice, mix local" in out
    assert "now: client alice, mix logits, weight 0.5" in out and "weight auto" in out
    assert "error: /mix takes one of global, local, adapter, logits" in out
    assert "error: unknown client 'carol'" in out
    assert "history cleared" in out
    assert out.count("> ") >= 10


def test_chat_session_keeps_history(runs: dict[str, Path]) -> None:
    from fedlm.inference.chat import ChatSession
    from fedlm.inference.generate import SamplingParams
    from fedlm.inference.session import open_mixed

    mixed, spec, _ = open_mixed(runs["personal"], "alice", mix="local")
    session = ChatSession(mixed, spec, SamplingParams(max_tokens=3), system="Be brief.")
    first = session.turn("Hi", lambda _t: None)
    session.turn("More", lambda _t: None)
    assert session.history == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "More"},
        {"role": "assistant", "content": session.history[-1]["content"]},
    ]
    assert session.command("/reset") == "history cleared" and session.history == [{"role": "system", "content": "Be brief."}]


def test_other_peft_methods(runner: CliRunner, runs: dict[str, Path], tmp_path: Path) -> None:
    """IA3: local and logits mixes, the adapter mix refused; full: the global model; soft prompts: refused."""
    ia3 = tiny_run(tmp_path / "ia3", runner, peft={"method": "ia3"})
    add_clients(ia3)
    base = ["generate", str(ia3), "--prompts", str(runs["prompts"]), "--max-tokens", "3", "--client", "alice"]
    for mix in ("local", "logits"):
        result = runner.invoke(app, [*base, "--mix", mix, "--out", str(tmp_path / f"{mix}.jsonl")])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*base, "--mix", "adapter"])
    assert result.exit_code == 2 and "`inference.mix: adapter` weights LoRA adapters" in result.output and "--mix logits" in result.output
    full = tiny_run(tmp_path / "full", runner, peft={"method": "full"}, federation={"lr": 1e-4})
    result = runner.invoke(app, ["generate", str(full), "--prompts", str(runs["prompts"]), "--max-tokens", "3", "--out", str(tmp_path / "f.jsonl")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "f.jsonl").read_text().splitlines()) == 3
    prompt = tiny_run(tmp_path / "prompt", runner, peft={"method": "prompt_tuning", "num_virtual_tokens": 4})
    result = runner.invoke(app, ["generate", str(prompt), "--prompts", str(runs["prompts"])])
    assert result.exit_code == 2 and "prompt_tuning" in result.output and "cannot be served" in result.output


def test_client_names_with_dots(runner: CliRunner, runs: dict[str, Path], tmp_path: Path) -> None:
    """Real client names look like ``noun.animal``; peft's adapter names may not hold dots."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs["personal"], run_dir)
    (run_dir / "clients" / "alice").rename(run_dir / "clients" / "noun.animal")
    out = tmp_path / "a.jsonl"
    args = ["generate", str(run_dir), "--prompts", str(runs["prompts"]), "--out", str(out), "--max-tokens", "3", "--client", "noun.animal"]
    for mix in ("local", "adapter", "logits"):
        result = runner.invoke(app, [*args, "--mix", mix, "--weight", "auto"])
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text().splitlines()[0])["client"] == "noun.animal"
