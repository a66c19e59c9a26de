"""``fedlm generate | chat | serve``: using a finished run's global, personal or mixed model (:mod:`fedlm.inference`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from fedlm.cli.guard import guarded
from fedlm.core.errors import FedlmError

RunArg = Annotated[Path, typer.Argument(help="a finished run folder (written by `fedlm run`)")]
ClientOpt = Annotated[str | None, typer.Option("--client", help="the client whose personal model answers (local and mixes)")]
MixOpt = Annotated[str | None, typer.Option("--mix", help="global | local | adapter | logits (default: the run's `inference.mix`)")]
WeightOpt = Annotated[str | None, typer.Option("--weight", help="personal model's weight in adapter/logits mixes: 0..1 or auto")]
MaxWeightOpt = Annotated[float | None, typer.Option("--max-weight", help="the most `--weight auto` gives the personal model")]
CombineOpt = Annotated[str | None, typer.Option("--combine", help="logits mix: linear | product")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=1, help="new tokens per answer at most")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0.0, max=2.0, help="0: greedy")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="nucleus sampling mass")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show full tracebacks")]

CHAT_HELP = "commands: /client NAME | /client (none: global) | /mix global|local|adapter|logits | /weight W|auto | /reset | /quit"


def generate(
    run_dir: RunArg,
    prompts: Annotated[Path, typer.Option("--prompts", help="JSONL: one {prompt} or {messages} or {text} object per line")],
    out: Annotated[Path | None, typer.Option("--out", help="answers JSONL (default: PROMPTS with .answers.jsonl)")] = None,
    client: ClientOpt = None,
    mix: MixOpt = None,
    weight: WeightOpt = None,
    max_weight: MaxWeightOpt = None,
    combine: CombineOpt = None,
    max_tokens: MaxTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="prompts per batch")] = 8,
    seed: Annotated[int | None, typer.Option("--seed", help="sampling seed (per prompt: seed + line index)")] = None,
    debug: DebugOpt = False,
) -> None:
    """Answer every prompt of a JSONL file with the chosen model (batched); writes one JSON answer per line."""

    def action() -> None:
        from fedlm.inference.generate import SamplingParams, chat_prompt
        from fedlm.inference.generate import generate as run_generate
        from fedlm.inference.session import open_mixed, read_prompts, row_messages

        rows = read_prompts(prompts)
        mixed, spec, _ = open_mixed(run_dir, client, mix=mix, weight=weight, max_weight=max_weight, combine=combine)
        tokenizer = mixed.run.tokenizer
        ids = [chat_prompt(tokenizer, m) if (m := row_messages(r)) is not None else tokenizer(str(r["text"]))["input_ids"] for r in rows]
        target = out or prompts.with_suffix(".answers.jsonl")
        with target.open("w") as sink:
            for start in range(0, len(rows), batch_size):
                idx = range(start, min(start + batch_size, len(rows)))
                params = [SamplingParams(max_tokens, temperature, top_p, (), None if seed is None else seed + i) for i in idx]
                for i, result in zip(idx, run_generate(mixed, spec, [ids[i] for i in idx], params)):
                    answer = {**rows[i], "answer": result.text, "finish_reason": result.finish_reason, "mix": spec.mix, "client": spec.client}
                    sink.write(json.dumps(answer) + "\n")
        typer.echo(f"{len(rows)} answers ({spec.mix}{'' if spec.client is None else ', client ' + spec.client}): {target}")

    guarded(debug, action)


def chat(
    run_dir: RunArg,
    client: ClientOpt = None,
    mix: MixOpt = None,
    weight: WeightOpt = None,
    max_weight: MaxWeightOpt = None,
    combine: CombineOpt = None,
    max_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    system: Annotated[str | None, typer.Option("--system", help="a system message at the start of the conversation")] = None,
    debug: DebugOpt = False,
) -> None:
    """An interactive chat in the terminal (the model's chat template, streamed tokens, history); type /help."""

    def action() -> None:
        from fedlm.inference.chat import ChatSession
        from fedlm.inference.generate import SamplingParams
        from fedlm.inference.session import open_mixed

        mixed, spec, _ = open_mixed(run_dir, client, mix=mix, weight=weight, max_weight=max_weight, combine=combine)
        session = ChatSession(mixed, spec, SamplingParams(max_tokens, temperature, top_p), system)
        typer.echo(f"fedlm chat: {session.describe()}. {CHAT_HELP}")
        session.loop(sys.stdin, _write)

    guarded(debug, action)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def serve(
    run_dir: RunArg,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="FEDLM_API_KEY", help="require `Authorization: Bearer KEY`")] = None,
    engine: Annotated[str, typer.Option("--engine", help="native (fedlm's, every mix) | vllm (CUDA, LoRA adapters)")] = "native",
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="concurrent requests batched together at most")] = 8,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", min=0.0, help="an idle server waits this long for a burst to batch")] = 20.0,
    weight: WeightOpt = None,
    max_weight: MaxWeightOpt = None,
    combine: CombineOpt = None,
    debug: DebugOpt = False,
) -> None:
    """An OpenAI-compatible HTTP server: /v1/models, /v1/chat/completions, /v1/completions (stream too)."""

    def action() -> None:
        if engine not in ("native", "vllm"):
            raise FedlmError(f"--engine must be native or vllm, got {engine!r}")
        if engine == "vllm":
            _exec_vllm(run_dir, host, port, api_key)
        import uvicorn

        from fedlm.inference.engine import Engine
        from fedlm.inference.run import open_run
        from fedlm.inference.server import create_app
        from fedlm.inference.session import inference_settings

        run = open_run(run_dir)
        settings = inference_settings(run.config.inference, weight=weight, max_weight=max_weight, combine=combine)
        worker = Engine(run, settings, max_batch=max_batch, batch_wait_s=batch_wait_ms / 1000)
        typer.echo(f"fedlm serve: http://{host}:{port}/v1 models: {', '.join(worker.model_ids())}")
        uvicorn.run(create_app(worker, api_key), host=host, port=port, log_level="warning")
        worker.close()

    guarded(debug, action)


def _exec_vllm(run_dir: Path, host: str, port: int, api_key: str | None) -> None:
    """Replace this process by vLLM's OpenAI server over the run's adapters (refused, with the reason, where it cannot run)."""
    from fedlm.config.io import load_config
    from fedlm.inference.vllm import vllm_command, vllm_refusal
    from fedlm.models.export import finished_run_config

    config = load_config(finished_run_config(run_dir))
    reason = vllm_refusal(config.peft.method, config.model.name)
    if reason is not None:
        raise FedlmError(reason)
    command = vllm_command(run_dir, config.model.name, config.peft.r, host, port, api_key)
    os.execv(command[0], command)


def register(app: typer.Typer) -> None:
    """Add ``generate``, ``chat`` and ``serve`` to the ``fedlm`` app."""
    app.command()(generate)
    app.command()(chat)
    app.command()(serve)
