"""Contribution-score benchmark (issue 18, part 4: the contribution share): leave-one-out vs GTG-Shapley vs exact
Shapley under a free-rider, a noisy client and a duplicated client, on SmolLM2-135M.

Six clients, all in every round (exact Shapley enumerates their 2^6 = 64 coalitions; it is the reference):
``animal``, ``food``, ``plant`` (honest, one WordNet domain each), ``plant_dup`` (plant's records, each twice: a
client inflating its data), ``free_rider`` (trains on noun.person but sends the global model back unchanged: a zero
delta) and ``noisy`` (trains on noun.body, then adds Gaussian noise of ``--noise-ratio`` times its update's RMS,
Blanchard et al. 2017's Gaussian worker). The server's validation set is half of the held-out records of those
domains (the other half is the test set). One run computes all three methods on the same updates
(``contribution.methods: [exact, gtg, loo]``; a coalition is priced once, each method's cost counts what it asked
for). Reported per round and cumulatively: Spearman's rank correlation of GTG and LOO with exact, GTG's largest
error relative to exact's largest score, whether the free-rider and the noisy client rank last, plant_dup's score
over plant's (Shapley should not credit duplicated data twice), and each method's cost in coalitions and server
forward passes per round.

Run (the lead, serially): ``python benchmarks/lifelong_contribution.py --write-results``.
Smoke (seconds): ``python benchmarks/lifelong_contribution.py --model tiny-random-llama --rounds 1 --local-steps 1
--examples 8 --validation-examples 8 --max-length 256 --out /tmp/contribution-smoke``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from common import HERE, publish

from fedlm.attacks.model_poisoning import gaussian_noise
from fedlm.config.io import validate_config
from fedlm.core.runtime import Runtime
from fedlm.core.seeding import derive_seed, torch_generator
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.data.readers import embedded_path
from fedlm.experiment import build_session, run_federated
from fedlm.reporting.contribution import spearman
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import prepare_run_dir
from fedlm.runtime.simulation import SimulationRuntime

START, END = "<!-- lifelong-contribution:start -->", "<!-- lifelong-contribution:end -->"
DOMAINS = {"animal": "noun.animal", "food": "noun.food", "plant": "noun.plant", "free_rider": "noun.person", "noisy": "noun.body"}
DUPLICATED = ("plant_dup", "plant")  # client, whose records it holds twice


@dataclasses.dataclass
class Misbehaving:
    """The simulation with the free-rider's update replaced by zeros and noise added to the noisy client's."""

    inner: Runtime
    noise_ratio: float
    seed: int

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> list[ClientUpdate | ClientFailure]:
        out: list[ClientUpdate | ClientFailure] = []
        for result in self.inner.train_clients(tasks):
            if isinstance(result, ClientUpdate) and result.client_id == "free_rider":
                result = dataclasses.replace(result, tensors={k: torch.zeros_like(v) for k, v in result.tensors.items()})
            elif isinstance(result, ClientUpdate) and result.client_id == "noisy":
                flat = torch.cat([v.flatten().float() for v in result.tensors.values()])
                std = self.noise_ratio * float(flat.pow(2).mean().sqrt())
                noised = gaussian_noise(result.tensors, std, torch_generator(derive_seed(self.seed, "noisy", result.round)))
                result = dataclasses.replace(result, tensors=noised)
            out.append(result)
        return out


def write_data(out: Path, examples: int, validation_examples: int, seed: int) -> tuple[Path, Path, Path]:
    """train.jsonl (a ``client`` field), validation.jsonl and test.jsonl from the embedded WordNet definitions."""
    rng = random.Random(seed)
    folder = embedded_path("embedded:wordnet_defs").parent
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    rows: list[dict[str, Any]] = []
    for client, domain in DOMAINS.items():
        mine = rng.sample([r for r in train if r["domain"] == domain], examples)
        rows += [{**r, "client": client} for r in mine]
        if client == DUPLICATED[1]:
            rows += [{**r, "client": DUPLICATED[0]} for r in mine for _ in range(2)]
    held = [r for r in held if r["domain"] in DOMAINS.values()]
    rng.shuffle(held)
    validation, test = held[: len(held) // 2][:validation_examples], held[len(held) // 2 :]
    paths = (out / "data" / "train.jsonl", out / "data" / "validation.jsonl", out / "data" / "test.jsonl")
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path, records in zip(paths, (rows, validation, test)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def experiment(args: argparse.Namespace, paths: tuple[Path, Path, Path]) -> dict[str, Any]:
    return {
        "seed": args.seed,
        "output_dir": str(args.out / "run"),
        "model": {"name": args.model, "dtype": "auto"},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {
            "train": str(paths[0]),
            "test": str(paths[2]),
            "system_prompt": "Answer with a short dictionary definition.",
            "max_length": args.max_length,
        },
        "partition": {"method": "by_field", "field": "client"},
        "federation": {"rounds": args.rounds, "local_steps": args.local_steps, "batch_size": 8, "lr": 0.002, "lr_schedule": "cosine"},
        "eval": {"every": 0, "at_start": False, "generate": False, "max_examples": 64, "batch_size": 16},
        "contribution": {"methods": ["exact", "gtg", "loo"], "validation": str(paths[1]), "validation_examples": args.validation_examples},
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The federated run with the three methods; its ``aggregate`` records."""
    paths = write_data(args.out, args.examples, args.validation_examples, args.seed)
    config = validate_config(experiment(args, paths))
    run_dir = prepare_run_dir(config.output_dir, resume=False, overwrite=True)
    console = RunConsole()
    session = build_session(config, console)
    run_dir.create()
    console.attach(run_dir.log)
    trainer = session.trainer(session.aggregator().trainer_hooks())
    runtime = Misbehaving(SimulationRuntime(trainer, session.data.client_train), args.noise_ratio, args.seed)
    run_federated(session, run_dir, False, console, runtime=runtime)
    records = [json.loads(line) for line in run_dir.metrics.read_text().splitlines()]
    return [r for r in records if r["split"] == "aggregate" and r.get("contribution")]


def compare(scores: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """GTG and LOO against exact on one set of scores (a round's, or the cumulative ones)."""
    exact = scores["exact"]
    clients = sorted(exact)
    scale = max(abs(v) for v in exact.values()) or 1.0
    last_two = set(sorted(clients, key=lambda c: scores["exact"][c])[:2])
    out: dict[str, Any] = {"bad_clients_last (exact)": last_two == {"free_rider", "noisy"}}
    for method in ("gtg", "loo"):
        out[f"spearman {method}"] = spearman([exact[c] for c in clients], [scores[method][c] for c in clients])
        out[f"max err {method}"] = max(abs(scores[method][c] - exact[c]) for c in clients) / scale
        out[f"bad last ({method})"] = set(sorted(clients, key=lambda c: scores[method][c])[:2]) == {"free_rider", "noisy"}
    for method in ("exact", "gtg", "loo"):
        dup, orig = scores[method][DUPLICATED[0]], scores[method][DUPLICATED[1]]
        out[f"dup/orig {method}"] = dup / orig if orig else None
    return out


def summarize(rounds: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    per_round = []
    for r in rounds:
        entry = r["contribution"]
        per_round.append({"round": r["round"], **compare({m: e["scores"] for m, e in entry["methods"].items()})})
    last = rounds[-1]["contribution"]
    cost = {
        m: {
            "coalitions / round": sum(r["contribution"]["methods"][m]["coalitions"] for r in rounds) / len(rounds),
            "forward passes / round": sum(r["contribution"]["methods"][m]["forward_passes"] for r in rounds) / len(rounds),
        }
        for m in ("exact", "gtg", "loo")
    }
    seconds_per_coalition = sum(r["contribution"]["time_s"] for r in rounds) / max(sum(r["contribution"]["coalitions_priced"] for r in rounds), 1)
    return {
        "per_round": per_round,
        "cumulative": compare({m: e["cumulative"] for m, e in last["methods"].items()}),
        "cumulative_scores": {m: e["cumulative"] for m, e in last["methods"].items()},
        "cost": cost,
        "seconds_per_coalition": seconds_per_coalition,
        "validation_examples": last["validation_examples"],
        "wall_s": elapsed,
    }


def markdown(summary: dict[str, Any], args: argparse.Namespace) -> str:
    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    keys = [k for k in summary["cumulative"]]
    lines = [
        f"Model `{args.model}` (dtype auto: float32 on this CPU, AMD EPYC with AVX2, no AVX512-BF16, 2 cores), 6 clients all in every round, "
        f"{args.rounds} rounds x {args.local_steps} local steps, {summary['validation_examples']} server validation examples, "
        f"noisy client: noise {args.noise_ratio}x its update's RMS. Wall time {summary['wall_s']:.0f} s.",
        "",
        "| scores | " + " | ".join(keys) + " |",
        "|" + "---|" * (len(keys) + 1),
    ]
    for row in summary["per_round"]:
        lines.append(f"| round {row['round']} | " + " | ".join(fmt(row[k]) for k in keys) + " |")
    lines.append("| cumulative | " + " | ".join(fmt(summary["cumulative"][k]) for k in keys) + " |")
    lines += ["", "| method | cumulative scores | coalitions / round | forward passes / round |", "|---|---|---|---|"]
    for method, cost in summary["cost"].items():
        scores = ", ".join(f"{c} {v:+.4f}" for c, v in sorted(summary["cumulative_scores"][method].items(), key=lambda cv: -cv[1]))
        lines.append(f"| {method} | {scores} | {cost['coalitions / round']:.1f} | {cost['forward passes / round']:.1f} |")
    lines.append(f"\nA coalition costs {summary['seconds_per_coalition']:.2f} s of server time (aggregation + validation forward passes).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--examples", type=int, default=64, help="training records per client (plant_dup: twice plant's)")
    parser.add_argument("--validation-examples", type=int, default=64)
    parser.add_argument("--noise-ratio", type=float, default=3.0)
    parser.add_argument("--max-length", type=int, default=96, help="tokens per example (the tiny model's byte tokenizer needs ~256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE.parent / "runs" / "bench_lifelong_contribution")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    rounds = run(args)
    summary = summarize(rounds, time.perf_counter() - started)
    summary["machine"] = platform.processor() or platform.machine()
    publish(args.out, summary, markdown(summary, args), args.write_results, START, END, "Contribution scores: LOO vs GTG-Shapley vs exact")


if __name__ == "__main__":
    main()
