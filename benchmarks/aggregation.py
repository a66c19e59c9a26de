"""Aggregation suite benchmark: every aggregator and every LoRA mode on the same federated work, plus the cost of
one aggregation step for 100 clients x a LoRA of ~1M parameters.

Part 1 (``--runs``): ``fedlm run`` on the real default model and the embedded non-IID WordNet data (8 domain
clients, 4 per round), once per (aggregator, LoRA mode, ranks) with the same seed, steps and data; records the
global-test loss per round and the bytes on the wire per round. Part 2 (``--timing``): one server step (validation,
LoRA mapping, aggregation) on synthetic updates. ``--write-results`` puts both tables and a plot into
``benchmarks/RESULTS.md`` / ``benchmarks/aggregation.png``. Smoke: ``--model tiny-random-llama --rounds 1``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import HERE, read_metrics, run_cli, write_results_block

START, END = "<!-- aggregation:start -->", "<!-- aggregation:end -->"
HETERO = [2, 4, 8, 2, 4, 8, 4, 8]  # one rank per client (global r = 8), e.g. three device classes
RUNS: list[tuple[str, str, bool]] = [
    ("fedavg", "naive", False),
    ("fedavgm", "naive", False),
    ("fedprox", "naive", False),
    ("scaffold", "naive", False),
    ("fedadagrad", "naive", False),
    ("fedadam", "naive", False),
    ("fedyogi", "naive", False),
    ("fedavg", "exact", False),
    ("fedavg", "ffa", False),
    ("fedavg", "naive", True),
    ("fedavg", "exact", True),
    ("fedavg", "ffa", True),
]


def run_name(name: str, lora: str, hetero: bool) -> str:
    return f"{name}-{lora}" + ("-hetero" if hetero else "")


def overrides(args: argparse.Namespace, name: str, lora: str, hetero: bool) -> dict[str, Any]:
    """Settings on top of the quickstart config: fewer steps, loss-only evaluation every round."""
    items: dict[str, Any] = {
        "model.name": args.model,
        "federation.rounds": args.rounds,
        "federation.local_steps": args.local_steps,
        "federation.clients_per_round": 4,
        "eval.every": 1,
        "eval.generate": False,
        "eval.max_examples": args.eval_examples,
        "aggregation.name": name,
        "aggregation.lora": lora,
        "federation.checkpoint_every": args.rounds,
    }
    if hetero:
        items["peft.client_ranks"] = HETERO
    if args.model == "tiny-random-llama":
        items["data.max_length"] = 256
    return items


def run_one(args: argparse.Namespace, name: str, lora: str, hetero: bool) -> dict[str, Any]:
    """Run (or reuse) one configuration and summarise its metrics.jsonl."""
    folder = args.out / run_name(name, lora, hetero)
    run_cli(folder, overrides(args, name, lora, hetero))
    return summarise(folder, name, lora, hetero)


def summarise(folder: Path, name: str, lora: str, hetero: bool) -> dict[str, Any]:
    records = read_metrics(folder)
    test = {r["round"]: r["loss"] for r in records if r.get("split") == "global_test"}
    rounds = [r for r in records if r.get("split") == "aggregate"]
    return {
        "run": run_name(name, lora, hetero),
        "aggregator": name,
        "lora": lora,
        "ranks": HETERO if hetero else "all 8",
        "test_loss": [test[k] for k in sorted(test)],
        "mib_per_round": statistics.mean((r["download_bytes"] + r["upload_bytes"]) / 2**20 for r in rounds),
        "upload_mib_per_round": statistics.mean(r["upload_bytes"] / 2**20 for r in rounds),
        "round_time_s": statistics.mean(r["train_time_s"] for r in rounds),
        "svd_rel_error": [r["aggregation"].get("svd_rel_error") for r in rounds],
    }


def synthetic_round(clients: int, layers: int = 30, rank: int = 8, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """A SmolLM2-shaped LoRA (q,k,v,o of 30 layers at r=8: 921,600 parameters) and ``clients`` random updates."""
    from fedlm.core.update import ClientUpdate

    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for module, (d_out, d_in) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * 0.02
            state[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.02
    updates = [ClientUpdate(f"c{k}", 1, 10 + k, {n: torch.randn(t.shape, generator=g) * 1e-3 for n, t in state.items()}) for k in range(clients)]
    return state, updates


def time_server_step(clients: int, name: str, lora: str, repeats: int) -> dict[str, Any]:
    """Seconds for one server step: validation, mapping into the LoRA mode's space, aggregation, mapping back."""
    from fedlm.aggregation.base import build_aggregator
    from fedlm.aggregation.lora import build_lora_mode
    from fedlm.federation.validation import Expectations, split_valid

    state, updates = synthetic_round(clients)
    if lora == "ffa":  # B only
        state = {n: t for n, t in state.items() if "lora_B" in n}
        updates = [type(u)(u.client_id, u.round, u.num_examples, {n: u.tensors[n] for n in state}) for u in updates]
    mode = build_lora_mode(lora, state, 8)
    times = []
    for _ in range(repeats):
        aggregator = build_aggregator(name, {})
        aggregator.start([u.client_id for u in updates])
        started = time.perf_counter()
        accepted, _ = split_valid(updates, Expectations(1, state, federation={u.client_id for u in updates}))
        space, mapped = mode.to_server_space(state, accepted, {u.client_id: state for u in updates}, {})
        result = aggregator.aggregate(space, mapped)
        mode.from_server_space(result.params, state)
        times.append(time.perf_counter() - started)
    params = sum(t.numel() for t in state.values())
    return {"aggregator": name, "lora": lora, "clients": clients, "params": params, "seconds": min(times)}


def results_markdown(runs: list[dict[str, Any]], timings: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Model `{args.model}`, embedded WordNet definitions split by domain (8 clients, 4 per round), "
        f"{args.rounds} rounds x {args.local_steps} local steps x batch 8, lr 0.002 cosine, seed 0; global-test loss "
        f"on {args.eval_examples} held-out examples (lower is better). Default parameters of every aggregator. "
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads. "
        f"Regenerate: `python benchmarks/aggregation.py --runs --timing --write-results`.",
        "",
        "| run | aggregator | LoRA mode | client ranks | test loss per round (0..R) | MiB / round (down+up) | upload MiB / round | round time (s) | SVD rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        svd = [e for e in r["svd_rel_error"] if e is not None]
        lines.append(
            f"| {r['run']} | {r['aggregator']} | {r['lora']} | {r['ranks']} | {' / '.join(f'{x:.3f}' for x in r['test_loss'])} | "
            f"{r['mib_per_round']:.2f} | {r['upload_mib_per_round']:.2f} | {r['round_time_s']:.0f} | "
            f"{'-' if not svd else ', '.join(f'{e:.3f}' for e in svd)} |"
        )
    if timings:
        lines += [
            "",
            "One server step (validation + LoRA mapping + aggregation) on synthetic updates, best of repeats:",
            "",
            "| aggregator | LoRA mode | clients | trainable parameters | seconds |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {t['aggregator']} | {t['lora']} | {t['clients']} | {t['params']:,} | {t['seconds']:.2f} |" for t in timings]
    lines += ["", "![global-test loss per round](aggregation.png)"]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.get_cmap("tab20").colors
    styles = {"naive": "-", "exact": "--", "ffa": ":"}
    for i, r in enumerate(runs):
        axes[0].plot(range(len(r["test_loss"])), r["test_loss"], marker="o", label=r["run"], color=colours[i % 20], linestyle=styles[r["lora"]])
    axes[0].set(xlabel="round", ylabel="global-test loss", title="Global-test loss per round")
    axes[0].legend(fontsize=7)
    names = [r["run"] for r in runs]
    axes[1].barh(names, [r["mib_per_round"] for r in runs])
    axes[1].set(xlabel="MiB per round (download + upload)", title="Bytes on the wire")
    axes[1].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", action="store_true", help="part 1: the federated runs")
    parser.add_argument("--timing", action="store_true", help="part 2: one aggregation step for 100 clients")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--only", nargs="*", help="run names to run (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "aggregation")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    runs = []
    if args.runs:
        for name, lora, hetero in RUNS:
            if not args.only or run_name(name, lora, hetero) in args.only:
                runs.append(run_one(args, name, lora, hetero))
        (args.out / "summary.json").write_text(json.dumps(runs, indent=1))
    timings = []
    timing_file = args.out / "timing.json"
    if args.timing:
        for name, lora in [("fedavg", "naive"), ("fedavg", "ffa"), ("fedavg", "exact"), ("fedadam", "naive"), ("fedadam", "exact")]:
            timings.append(time_server_step(args.clients, name, lora, repeats=2))
            print(json.dumps(timings[-1]), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        timing_file.write_text(json.dumps(timings, indent=1))
    elif timing_file.is_file():
        timings = json.loads(timing_file.read_text())  # the last measured step timings
    markdown = results_markdown(runs, timings, args)
    print(markdown)
    if args.write_results:
        if runs:
            plot(runs, HERE / "aggregation.png")
        write_results_block(START, END, "Aggregation suite (`benchmarks/aggregation.py`)", markdown)


if __name__ == "__main__":
    main()
