"""Continual federated learning benchmark (the continual part of ``benchmarks/lifelong.py``, issue 18 part 4): on
SmolLM2-135M, three WordNet domains arrive one after the other at every client; the accuracy matrix (multiple-choice
accuracy and loss on each domain's test records after each stage), average forgetting, backward and forward transfer,
without a mitigation, with rehearsal, with EWC on the adapter, with both, and with every slice kept (joint training,
the upper bound).

``python benchmarks/lifelong_continual.py [--arms none,rehearsal,ewc] [--write-results]``; resumable (a finished arm is
not run again); smoke: ``--model tiny-random-llama --rounds-per-slice 1 --local-steps 2``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import HERE, publish, read_metrics, run_cli

START, END = "<!-- lifelong-continual:start -->", "<!-- lifelong-continual:end -->"
SLICES = ["noun.food", "noun.plant", "verb.motion"]
ARMS: dict[str, dict[str, Any]] = {
    "none": {},
    "rehearsal": {"mitigations": ["rehearsal"]},
    "ewc": {"mitigations": ["ewc"]},
    "both": {"mitigations": ["rehearsal", "ewc"]},
    "joint": {"accumulate": True},
}
SUMMARY = ("average", "forgetting", "bwt", "fwt")


def overrides(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """The ``--set`` keys of one arm on the quickstart config."""
    tiny = {"data.max_length": 256} if args.model == "tiny-random-llama" else {}  # its byte-level tokenizer
    continual = {
        "field": "domain",
        "slices": SLICES,
        "stream": "round",
        "rounds_per_slice": args.rounds_per_slice,
        "rehearsal": {"buffer_size": args.buffer_size},
        "ewc": {"strength": args.ewc_strength, "samples": 8},
        **ARMS[arm],
    }
    rounds = len(SLICES) * args.rounds_per_slice
    return {
        **tiny,
        "model.name": args.model,
        "data.train": "embedded:wordnet_mc",
        "data.max_train_examples": args.train_examples,
        "partition": json.dumps({"method": "iid", "num_clients": args.clients}),
        "federation.rounds": rounds,
        "federation.clients_per_round": args.clients,
        "federation.local_steps": args.local_steps,
        "federation.lr_schedule": "constant",
        "federation.checkpoint_every": rounds,
        "eval.every": 0,
        "eval.generate": False,
        "eval.max_examples": 320,  # the whole test split; its records of the three domains (40 each) are scored
        "continual": json.dumps(continual),
    }


def run_arm(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    folder = args.out / arm
    seconds = run_cli(folder, overrides(arm, args))
    records = read_metrics(folder)
    matrices: dict[str, dict[str, dict[str, float]]] = {}
    for r in records:
        if r.get("split") == "continual":
            for metric in ("mc_accuracy", "loss"):
                if r.get(metric) is not None:
                    matrices.setdefault(metric, {}).setdefault(str(r["stage"]), {})[r["slice"]] = r[metric]
    last = max((r["stage"] for r in records if r.get("split") == "forgetting"), default=None)
    summary = {r["metric"]: {k: r.get(k) for k in SUMMARY} for r in records if r.get("split") == "forgetting" and r["stage"] == last}
    return {"arm": arm, "settings": ARMS[arm], "seconds": seconds, "matrices": matrices, "summary": summary}


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"`{args.model}` (float32, 2-core AMD EPYC without AVX512-BF16), SFT on `embedded:wordnet_mc` ({args.train_examples} "
        f"training records, iid over {args.clients} clients, all in every round); the domains {', '.join(SLICES)} arrive in that "
        f"order, {args.rounds_per_slice} rounds each x {args.local_steps} local steps x batch 8, lr 2e-3 constant; rehearsal buffer "
        f"{args.buffer_size} records per client; EWC strength {args.ewc_strength:g} (Fisher on 8 examples). Scores on each domain's "
        "40 test records after each stage (stage 0: the base model). Forgetting (Chaudhry et al. 2018), BWT and FWT (Lopez-Paz & "
        "Ranzato 2017) after the last stage; for the loss on -loss (positive forgetting, negative BWT: forgotten).",
        "",
        "| arm | run s | MC acc. avg | MC forgetting | MC BWT | MC FWT | loss avg | loss forgetting | loss BWT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        mc, loss = res["summary"].get("mc_accuracy", {}), res["summary"].get("loss", {})
        lines.append(
            f"| {res['arm']} | {res['seconds']:.0f} | {_cell(mc.get('average'))} | {_cell(mc.get('forgetting'))} | {_cell(mc.get('bwt'))} | "
            f"{_cell(mc.get('fwt'))} | {_cell(loss.get('average'))} | {_cell(loss.get('forgetting'))} | {_cell(loss.get('bwt'))} |"
        )
    lines.append("")
    for res in results:
        for metric, matrix in res["matrices"].items():
            lines += [f"**{res['arm']}**, {metric} (rows: after stage; columns: test domain)", "", "| stage | " + " | ".join(SLICES) + " |"]
            lines.append("|---" * (len(SLICES) + 1) + "|")
            lines += [
                f"| {k} | " + " | ".join(_cell(row.get(s)) for s in SLICES) + " |" for k, row in sorted(matrix.items(), key=lambda kv: int(kv[0]))
            ]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--train-examples", type=int, default=4000, help="records read before the three domains are kept (4000: all)")
    parser.add_argument("--rounds-per-slice", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--buffer-size", type=int, default=32)
    parser.add_argument("--ewc-strength", type=float, default=1000.0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lifelong_continual")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    results = [run_arm(a, args) for a in args.arms.split(",")]
    publish(
        args.out,
        results,
        markdown(results, args),
        args.write_results,
        START,
        END,
        "Continual federated learning (`benchmarks/lifelong_continual.py`)",
    )


if __name__ == "__main__":
    main()
