"""Teacher benchmark (issue 19, part 2): learning from a black-box teacher vs no teacher, on the quickstart setup
(SmolLM2-135M, the eight WordNet domains as eight clients).

The teacher is the same model trained centrally (one client holding all the training data, ``--teacher-steps``
steps), served by ``fedlm serve`` on 127.0.0.1 as any OpenAI-compatible endpoint. Then three federated runs with the
same seed and schedule: no teacher, ``teacher.mode: label`` (clients send their prompts) and ``teacher.mode:
synthetic`` (clients send only prompts sampled from a generator trained with DP-SGD). Per run: final global-test
loss, exact match and ROUGE-L, the requests that reached the teacher, and the synthetic mode's generator epsilon.

``python benchmarks/teacher.py [--write-results]``; resumable (a finished run is not run again); smoke:
``python benchmarks/teacher.py --model tiny-random-llama --rounds 1 --local-steps 1 --teacher-steps 2 --eval-examples 8``.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import HERE, arm_parser, publish, read_metrics, run_arms, run_cli

START, END = "<!-- teacher:start -->", "<!-- teacher:end -->"


def common(args: argparse.Namespace) -> dict[str, Any]:
    tiny = {"data.max_length": 256} if args.model == "tiny-random-llama" else {}  # its byte-level tokenizer
    return {
        **tiny,
        "model.name": args.model,
        "federation.rounds": args.rounds,
        "federation.local_steps": args.local_steps,
        "federation.checkpoint_every": args.rounds,
        "eval.every": args.rounds,
        "eval.at_start": False,
        "eval.max_examples": args.eval_examples,
    }


def teacher_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The central run: all the training data on one client, ``teacher_steps`` steps in one round."""
    return {
        **common(args),
        "partition": json.dumps({"method": "iid", "num_clients": 1}),
        "federation.rounds": 1,
        "federation.clients_per_round": 1,
        "federation.local_steps": args.teacher_steps,
        "federation.checkpoint_every": 1,
        "eval.every": 1,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def served(run_dir: Path) -> Iterator[str]:
    """``fedlm serve run_dir`` in a subprocess on a free port; yields its ``base_url`` once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fedlm.cli", "serve", str(run_dir), "--port", str(port)], stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"{base}/models", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fedlm serve {run_dir} did not start") from None
                time.sleep(1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def summary(folder: Path, name: str, seconds: float) -> dict[str, Any]:
    records = read_metrics(folder)
    test = [r for r in records if r.get("split") == "global_test"]
    train = [r for r in records if r.get("split") == "train"]
    last = test[-1] if test else {}
    epsilons = [r["generator_epsilon"] for r in train if "generator_epsilon" in r]
    return {
        "run": name,
        "seconds": seconds,
        "loss": last.get("loss"),
        "exact_match": last.get("exact_match"),
        "rouge_l": last.get("rouge_l"),
        "teacher_requests": int(sum(r.get("teacher_sent", 0) for r in train)),
        "teacher_cache_hits": int(sum(r.get("teacher_cache_hits", 0) for r in train)),
        "topk_examples": int(sum(r.get("teacher_topk_examples", 0) for r in train)),
        "synthetic_filtered": int(
            sum({r["client"]: r["synthetic_filtered"] for r in train if "synthetic_filtered" in r}.values())
        ),  # once per client
        "generator_epsilon": max(epsilons) if epsilons else None,
        "failed_clients": sum(len(r.get("rejected", [])) for r in records if r.get("split") == "aggregate"),
    }


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def cell(value: Any, fmt: str = ".3f") -> str:
        return "–" if value is None else format(value, fmt)

    lines = [
        f"`{args.model}` (float32, 2-core AMD EPYC without AVX512-BF16), SFT on the WordNet domains (8 clients, 4 per round, "
        f"{args.rounds} rounds x {args.local_steps} local steps x batch 8, {args.train_examples} training records). Teacher: the same model trained centrally for "
        f"{args.teacher_steps} steps on all the training records, served by `fedlm serve` (no logprobs: sequence-level KD), mix {args.mix}, greedy answers of "
        f"at most {args.max_tokens} tokens. Synthetic mode: {args.num_prompts} prompts per client from a LoRA generator trained "
        f"with DP-SGD (sigma {args.noise_multiplier}, {args.generator_steps} steps), verbatim filter over 8 tokens. "
        f"Metrics on {args.eval_examples} held-out examples after the last round.",
        "",
        "| run | test loss | exact match | ROUGE-L | teacher requests | cache hits | filtered prompts | generator epsilon (delta 1e-5) | failed clients | run (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['run']} | {cell(r['loss'])} | {cell(r['exact_match'])} | {cell(r['rouge_l'])} | {r['teacher_requests']} | "
            f"{r['teacher_cache_hits']} | {r['synthetic_filtered']} | {cell(r['generator_epsilon'], '.2f')} | {r['failed_clients']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = arm_parser(__doc__, HERE / "results" / "teacher", rounds=4, local_steps=5)
    parser.add_argument("--teacher-steps", type=int, default=160)
    parser.add_argument("--train-examples", type=int, default=800, help="the federation's training records (each one a teacher request)")
    parser.add_argument("--mix", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--generator-steps", type=int, default=20)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    args = parser.parse_args()
    teacher_dir = args.out / "central-teacher"
    run_cli(teacher_dir, teacher_overrides(args))
    base = {**common(args), "data.max_train_examples": args.train_examples}  # the teacher trained on all of it
    section = {"base_url": None, "model": "global", "mix": args.mix, "max_tokens": args.max_tokens, "retries": 5, "timeout_s": 600, "concurrency": 8}
    synthetic = {"num_prompts": args.num_prompts, "steps": args.generator_steps, "noise_multiplier": args.noise_multiplier}
    with served(teacher_dir) as url:
        arms = {
            "no teacher": base,
            "label": {**base, "teacher": json.dumps({**section, "base_url": url, "mode": "label"})},
            "synthetic": {**base, "teacher": json.dumps({**section, "base_url": url, "mode": "synthetic", "synthetic": synthetic})},
        }
        results = run_arms(args.out, arms, summary)
    publish(args.out, results, markdown(results, args), args.write_results, START, END, "Black-box teacher (`benchmarks/teacher.py`)")


if __name__ == "__main__":
    main()
