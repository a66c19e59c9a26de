"""Lifecycle benchmark: every PEFT method on the same federated SFT work, and federated DPO before and after.

Part 1 (PEFT methods). The quickstart setup (real default model, WordNet domains) for each ``peft.method`` with the
same rounds, clients and local steps: trainable parameters (counted in the saved global adapter state), bytes per
round (down + up, as they travel), mean time per local optimizer step, and the final global-test loss. Learning
rates are per method, the usual orders of magnitude for each (LoRA/DoRA 2e-3, IA3 5e-3, prefix 1e-2, prompt tuning
3e-2, full fine-tuning 5e-5), the same for every run of a method.

Part 2 (DPO). Federated DPO (``objective: dpo``, beta 0.1) on ``embedded:wordnet_prefs`` from the base model:
held-out preference metrics before (round 0) and after alignment: ``likelihood_accuracy`` (the share of pairs whose
correct definition the model finds likelier than the wrong one, reference-free), and the DPO reward margin and
preference accuracy against the reference (the base model, adapter disabled; both 0 at round 0 by definition).

``python benchmarks/lifecycle.py [--part 1|2|all] [--write-results]``; resumable; smoke: ``--model tiny-random-llama``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common import HERE, publish, read_metrics, run_cli
from safetensors import safe_open

START, END = "<!-- lifecycle:start -->", "<!-- lifecycle:end -->"
METHODS: dict[str, float] = {"lora": 2e-3, "dora": 2e-3, "ia3": 5e-3, "prefix_tuning": 1e-2, "prompt_tuning": 3e-2, "full": 5e-5}


def common(args: argparse.Namespace) -> dict[str, Any]:
    items: dict[str, Any] = {
        "model.name": args.model,
        "federation.rounds": args.rounds,
        "federation.local_steps": args.local_steps,
        "federation.clients_per_round": args.clients,
        "federation.batch_size": 4,
        "federation.lr_schedule": "constant",
        "eval.every": args.rounds,
        "eval.generate": False,
        "eval.max_examples": 64,
        "federation.checkpoint_every": args.rounds,
    }
    if args.model == "tiny-random-llama":
        items["data.max_length"] = 256
    return items


def trainable_parameters(folder: Path) -> int:
    """Elements of the saved global adapter state of the run's last checkpoint (what the federation trains)."""
    checkpoint = sorted((folder / "checkpoints").iterdir())[-1]
    with safe_open(str(checkpoint / "global_adapter.safetensors"), "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape: list[int]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def part1(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for method, lr in METHODS.items():
        folder = args.out / "peft" / method
        run_cli(folder, {**common(args), "peft.method": method, "federation.lr": lr, "eval.at_start": False})
        records = read_metrics(folder)
        rounds = [r for r in records if r.get("split") == "aggregate"]
        final = max(r["round"] for r in records if r.get("split") == "global_test")
        loss = next(r["loss"] for r in records if r.get("split") == "global_test" and r["round"] == final)
        steps = args.clients * args.local_steps
        rows.append(
            {
                "method": method,
                "lr": lr,
                "trainable": trainable_parameters(folder),
                "loss": loss,
                "bytes_per_round": sum(r["download_bytes"] + r["upload_bytes"] for r in rounds) / len(rounds),
                "step_time_s": sum(r["train_time_s"] for r in rounds) / len(rounds) / steps,
            }
        )
    return rows


def part2(args: argparse.Namespace) -> dict[str, Any]:
    folder = args.out / "dpo"
    run_cli(
        folder,
        {
            **common(args),
            "data.train": "embedded:wordnet_prefs",
            "objective": '{"name": "dpo", "beta": 0.1}',
            "federation.lr": 5e-4,
            "eval.at_start": True,
        },
    )
    evals = {r["round"]: r for r in read_metrics(folder) if r.get("split") == "global_test"}
    before, after = evals[min(evals)], evals[max(evals)]
    keys = ("likelihood_accuracy", "preference_accuracy", "reward_margin", "loss")
    return {"before": {k: before.get(k) for k in keys}, "after": {k: after.get(k) for k in keys}, "examples": after.get("num_examples")}


def markdown(rows: list[dict[str, Any]], dpo: dict[str, Any] | None, args: argparse.Namespace) -> str:
    lines = []
    if rows:
        lines += [
            f"Part 1: `{args.model}`, SFT on the WordNet domains, {args.rounds} rounds x {args.clients} clients x "
            f"{args.local_steps} local steps x batch 4 for every method; final global-test loss on 64 examples.",
            "",
            "| peft.method | lr | trainable parameters | MiB per round (down + up) | s per local step | test loss |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} | {r['bytes_per_round'] / 2**20:.1f} | "
                f"{r['step_time_s']:.2f} | {r['loss']:.3f} |"
            )
    if dpo:
        b, a = dpo["before"], dpo["after"]
        lines += [
            "",
            f"Part 2: federated DPO (beta 0.1, lr 5e-4) on `embedded:wordnet_prefs` from the base model, same "
            f"rounds and clients; {dpo['examples']} held-out pairs.",
            "",
            "| | likelihood accuracy | preference accuracy (margin > 0) | reward margin | DPO loss |",
            "|---|---|---|---|---|",
            f"| before (round 0) | {b['likelihood_accuracy']:.3f} | {b['preference_accuracy']:.3f} | {b['reward_margin']:.4f} | {b['loss']:.4f} |",
            f"| after (round {args.rounds}) | {a['likelihood_accuracy']:.3f} | {a['preference_accuracy']:.3f} | {a['reward_margin']:.4f} | {a['loss']:.4f} |",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--part", choices=["1", "2", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lifecycle")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    dpo = part2(args) if args.part in ("2", "all") else None
    rows = part1(args) if args.part in ("1", "all") else []
    publish(args.out, {"peft": rows, "dpo": dpo}, markdown(rows, dpo, args), args.write_results, START, END, "Lifecycle (`benchmarks/lifecycle.py`)")


if __name__ == "__main__":
    main()
