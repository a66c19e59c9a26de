"""Personalization benchmark: every ``personalization.method`` on the quickstart setup (SmolLM2-135M, the eight
WordNet domains as eight clients), and per client the global model, the personal model and each mix on the
client's own test share and on the other clients' shares (the run's ``personal`` records).

The goal it checks (issue 16, section 3): the best personal or mixed model beats the global model on the client's
own share for at least 6 of the 8 clients while losing at most 5% of the global loss on the other shares.

``python benchmarks/personalization.py [--methods finetune,fedsa,...] [--write-results]``; resumable (a finished
run is not run again); smoke: ``--model tiny-random-llama``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from statistics import mean
from typing import Any

from common import HERE, publish, read_metrics, run_cli

START, END = "<!-- personalization:start -->", "<!-- personalization:end -->"
METHODS: dict[str, dict[str, Any]] = {
    "finetune": {},
    "fedsa": {},
    "ditto": {"lambda": 0.1},
    "dual": {"weight": 0.5},
    "prompt": {"num_virtual_tokens": 8, "lr": 0.02},
}
GOAL_CLIENTS, GOAL_OTHERS = 6, 0.05


def common(args: argparse.Namespace) -> dict[str, Any]:
    tiny = {"data.max_length": 256} if args.model == "tiny-random-llama" else {}  # its byte-level tokenizer
    return {
        **tiny,
        "model.name": args.model,
        "federation.rounds": args.rounds,
        "federation.clients_per_round": 8,
        "federation.local_steps": args.local_steps,
        "federation.lr_schedule": "constant",
        "federation.checkpoint_every": args.rounds,
        "eval.every": args.rounds,
        "eval.at_start": False,
        "eval.generate": False,
        "eval.max_examples": args.eval_examples,
    }


def best(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per client: the global losses and the best personal/mixed model within the 5% bound on the others' shares."""
    from fedlm.reporting.personalization import best_per_client  # noqa: PLC0415 - the benchmark runs fedlm through its CLI

    return best_per_client(records, GOAL_OTHERS)


def run_method(method: str, args: argparse.Namespace) -> dict[str, Any]:
    folder = args.out / method
    section = {"method": method, **METHODS[method]}
    seconds = run_cli(folder, {**common(args), "personalization": json.dumps(section)})
    records = [r for r in read_metrics(folder) if r.get("split") == "personal"]
    rounds = [r for r in read_metrics(folder) if r.get("split") == "aggregate"]
    table = {(r["client"], r["model"]): r for r in records}
    clients = sorted({r["client"] for r in records})
    models = list(dict.fromkeys(r["model"] for r in records))
    return {
        "method": method,
        "params": METHODS[method],
        "seconds": seconds,
        "round_time_s": sum(r.get("train_time_s", 0.0) for r in rounds) / max(len(rounds), 1),
        "clients": clients,
        "models": models,
        "own": {f"{c}|{m}": table[(c, m)].get("own_loss") for c in clients for m in models if (c, m) in table},
        "others": {f"{c}|{m}": table[(c, m)].get("others_loss") for c in clients for m in models if (c, m) in table},
        "best": best(records),
    }


def summary(results: list[dict[str, Any]]) -> list[str]:
    """One row per method: clients won, mean own-share and others'-shares loss of global vs best, the usual winner."""
    lines = [
        "| method | clients whose best personal or mixed model wins (goal: >= 6 of 8) | own-share loss, global -> best (mean) "
        "| others'-shares loss, global -> best (mean) | most chosen | run (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for res in results:
        rows = res["best"]
        if not rows:
            continue
        wins = sum(1 for b in rows if b["wins"])
        most, count = Counter(b["best"] for b in rows).most_common(1)[0]
        lines.append(
            f"| `{res['method']}` | {wins} of {len(rows)} | {mean(b['global_own'] for b in rows):.3f} -> "
            f"{mean(b['best_own'] for b in rows):.3f} | {mean(b['global_others'] for b in rows):.3f} -> "
            f"{mean(b['best_others'] for b in rows):.3f} | {most} ({count} of {len(rows)}) | {res['seconds']:.0f} |"
        )
    return lines


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        'Summary (means over the clients; "best" is the personal or mixed model with the lowest own-share loss among '
        "those within 5% of the global model on the others' shares):",
        "",
        *summary(results),
        "",
        f"`{args.model}` (float32, 2-core AMD EPYC without AVX512-BF16), SFT on the WordNet domains: 8 clients, all in each of "
        f"{args.rounds} rounds x {args.local_steps} local steps x batch 8, lr 2e-3 constant; personal training with the same "
        f"steps; losses on {args.eval_examples} held-out examples, each the test share of its domain's client. Cells: "
        "own-share loss / others'-shares loss. Mixes at weight 0.5 on the personal side.",
        "",
    ]
    for res in results:
        wins = sum(1 for b in res["best"] if b["wins"])
        lines += [
            f"**{res['method']}** {res['params'] or ''} — goal met for {wins} of {len(res['best'])} clients "
            f"({'met' if wins >= GOAL_CLIENTS else 'not met'}: >= {GOAL_CLIENTS}); run {res['seconds']:.0f} s.",
            "",
            "| client | " + " | ".join(res["models"]) + " | best | wins |",
            "|---" * (len(res["models"]) + 3) + "|",
        ]
        by_client = {b["client"]: b for b in res["best"]}
        for c in res["clients"]:
            cells = []
            for m in res["models"]:
                own, others = res["own"].get(f"{c}|{m}"), res["others"].get(f"{c}|{m}")
                cells.append("–" if own is None else f"{own:.3f} / {others:.3f}")
            b = by_client.get(c, {})
            lines.append(f"| {c} | " + " | ".join(cells) + f" | {b.get('best', '–')} | {b.get('wins', '–')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "personalization")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    results = [run_method(m, args) for m in args.methods.split(",")]
    publish(args.out, results, markdown(results, args), args.write_results, START, END, "Personalization (`benchmarks/personalization.py`)")


if __name__ == "__main__":
    main()
