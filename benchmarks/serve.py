"""Serving benchmark: ``fedlm serve`` on the real model, on this machine's CPU cores.

A finished SmolLM2-135M run (1 round of the quickstart) gets personal LoRA adapters for 8 clients (the global adapter
plus seeded noise: the same shapes and cost as trained ones). Measured against a real server process with the
``openai`` client, greedy, ``max_tokens`` new tokens per answer (answers may stop earlier at the end-of-turn token):

- time to first token (TTFT) and decode speed with 1 client, then with 8 concurrent clients each asking its own
  adapter (``client/c<i>``), which the engine batches into one forward pass per step;
- the server's resident memory with 8 client adapters loaded against 1 (goal <= 1.1x).

``python benchmarks/serve.py [--write-results]`` (smoke: ``--model tiny-random-llama --out /tmp/x``) (a few minutes; run it alone: ``flock /tmp/fedlm-heavy.lock ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import HERE, cpu_name, publish, run_cli

START, END = "<!-- serve:start -->", "<!-- serve:end -->"
SRC = HERE.parent / "src"
PROMPTS = [
    "Write a short story about a cat who learns to sail.",
    "Explain how a bicycle works.",
    "Describe the water cycle.",
    "What makes a good friend?",
    "Give advice to someone learning to cook.",
    "Describe a walk through a forest in autumn.",
    "Explain why the sky is blue.",
    "Tell me about the history of bread.",
]


def add_clients(run_dir: Path, n: int) -> None:
    """``n`` personal adapters ``c0..c{n-1}``: the global adapter plus seeded noise, ``combine: replace``."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.rmtree(run_dir / "clients", ignore_errors=True)
    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for i in range(n):
        folder = run_dir / "clients" / f"c{i}"
        shutil.copytree(run_dir / "adapter", folder / "adapter")
        gen = torch.Generator().manual_seed(i)
        noisy = {k: (v + 0.02 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in weights.items()}
        save_file(noisy, str(folder / "adapter" / "adapter_model.safetensors"))
        (folder / "personal.json").write_text(json.dumps({"method": "benchmark-noise", "combine": "replace"}))


class Server:
    """``fedlm serve`` in a subprocess on a free local port."""

    def __init__(self, run_dir: Path, threads: int) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "fedlm.cli", "serve", str(run_dir), "--port", str(self.port), "--max-batch", "8"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        import openai

        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=600)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                self.client.models.list()
                return
            except Exception:
                time.sleep(1)
        raise RuntimeError("server did not start")

    def rss_mib(self) -> float:
        import psutil

        return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20

    def stats(self) -> list[int]:
        import httpx

        return list(httpx.get(f"http://127.0.0.1:{self.port}/fedlm/stats").json()["batches"])

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def stream_one(server: Server, model: str, prompt: str, max_tokens: int, out: dict[str, Any]) -> None:
    """One streamed greedy chat request: TTFT, end time and completion tokens into ``out``."""
    started = time.perf_counter()
    first = None
    stream = server.client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens = 0
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    out.update(start=started, ttft=(first or end) - started, end=end, tokens=tokens)


def concurrent(server: Server, models: list[str], max_tokens: int) -> dict[str, float]:
    """``len(models)`` streamed requests at once (one per model): TTFT, per-request and aggregate tokens/s."""
    results: list[dict[str, Any]] = [{} for _ in models]
    threads = [threading.Thread(target=stream_one, args=(server, m, PROMPTS[i % len(PROMPTS)], max_tokens, results[i])) for i, m in enumerate(models)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    per_request = [(r["tokens"] - 1) / max(r["end"] - r["start"] - r["ttft"], 1e-9) for r in results if r["tokens"] > 1]
    return {
        "ttft_mean_s": statistics.mean(r["ttft"] for r in results),
        "ttft_max_s": max(r["ttft"] for r in results),
        "decode_tok_s_per_request": statistics.mean(per_request) if per_request else 0.0,
        "aggregate_tok_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="smoke: tiny-random-llama")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    base = args.out / "run"
    settings: dict[str, Any] = {"federation.rounds": 1, "federation.local_steps": 2, "federation.clients_per_round": 2, "eval.at_start": False}
    if args.model == "tiny-random-llama":
        settings["data.max_length"] = 512  # its byte tokenizer makes long sequences
    run_cli(base, {"model.name": args.model, **settings, "eval.generate": False, "eval.max_examples": 8})
    memory: dict[int, float] = {}
    rows: dict[str, dict[str, float]] = {}
    batches: dict[str, str] = {}  # the batch sizes the engine ran, in order
    for n in (1, 8):
        run_dir = args.out / f"run{n}"
        if not run_dir.exists():
            shutil.copytree(base, run_dir, ignore=shutil.ignore_patterns("checkpoints", "predictions", "plots"))
        add_clients(run_dir, n)
        server = Server(run_dir, args.threads)
        try:
            for i in range(n):  # every adapter used once, then the memory
                server.client.chat.completions.create(model=f"client/c{i}", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)
            memory[n] = server.rss_mib()
            if n == 8:
                for label, models in (("1 client", ["client/c0"]), ("8 clients, 8 adapters", [f"client/c{i}" for i in range(8)])):
                    before = len(server.stats())
                    runs = [concurrent(server, models, args.max_tokens) for _ in range(args.repeats)]
                    rows[label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                    batches[label] = " / ".join(str(b) for b in server.stats()[before:])
        finally:
            server.close()
    ratio = memory[8] / memory[1]
    summary = {"memory_mib": memory, "ratio": ratio, "rows": rows, "batches": batches, "max_tokens": args.max_tokens, "threads": args.threads}
    import torch

    lines = [
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads (OMP_NUM_THREADS), torch {torch.__version__}. "
        f"Model `{args.model}`, float32 (`model.dtype: auto` on this CPU), LoRA r=8 on q/k/v/o; greedy chat answers of up to "
        f"{args.max_tokens} new tokens, streamed, through the `openai` client against `fedlm serve` on 127.0.0.1 (median of {args.repeats} rounds). "
        "Regenerate: `flock /tmp/fedlm-heavy.lock python benchmarks/serve.py --write-results`.",
        "",
        "| load | TTFT mean (s) | TTFT max (s) | decode tokens/s per request | aggregate tokens/s | batches run (sizes) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['ttft_mean_s']:.2f} | {r['ttft_max_s']:.2f} | {r['decode_tok_s_per_request']:.1f} | {r['aggregate_tok_s']:.1f} | {batches[label]} |"
        )
    verdict = "PASS" if ratio <= 1.1 else "FAIL"
    lines += [
        "",
        f"- server RSS with 8 client adapters {memory[8]:.0f} MiB vs 1: {memory[1]:.0f} MiB, ratio {ratio:.3f} (goal <= 1.1): **{verdict}**",
    ]
    publish(args.out, summary, "\n".join(lines), args.write_results, START, END, "Serving (`benchmarks/serve.py`)")


if __name__ == "__main__":
    main()
