"""Privacy benchmark: what DP costs in utility and buys against membership inference, and what SecAgg+ costs.

Part 1 (utility and audit vs epsilon). The quickstart setup (real default model, WordNet domains, 8 clients, all
every round) on a small training set that the clients see several times (``--train-examples`` in all), so that
membership inference has something to find. For each setting: the final global-test loss, epsilon at delta 1e-5
(client-level: the accountant's, K = M = 8 so q = 1; sample-level: the worst client's), and the best AUC of the
loss / zlib / Min-K% attacks of ``fedlm audit`` (members: the training examples, non-members: held-out test examples).
Rows: no DP; client-level DP (DP-FedAvg, clip C) for several noise multipliers; sample-level DP-SGD for several
noise multipliers; and the same with secure aggregation (distributed noise for client-level DP).

Part 2 (SecAgg+ overhead). One round of 10, 50 and 100 IID clients (1 local step each) with and without secure
aggregation: round time, protocol time (clients' and server's compute), and bytes on the wire. SecAgg (all pairs)
at 10 clients, SecAgg+ with k = 2 ceil(log2 n) neighbours at 50 and 100. Goal: < 2x bytes and < 10% round time at 50.

``python benchmarks/privacy.py [--part 1|2|all] [--write-results]``; resumable (finished runs are reused);
smoke: ``--model tiny-random-llama``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import HERE, publish, read_metrics, run_cli

START, END = "<!-- privacy:start -->", "<!-- privacy:end -->"
CLIP = 1.0
SETTINGS: dict[str, dict[str, Any]] = {
    "none": {},
    "client z=0.001": {"privacy.client_dp": {"noise_multiplier": 0.001, "clip": CLIP}},
    "client z=0.01": {"privacy.client_dp": {"noise_multiplier": 0.01, "clip": CLIP}},
    "none + secagg": {"privacy.secure_aggregation": {}},
    "client z=0.01 + secagg": {
        "privacy.client_dp": {"noise_multiplier": 0.01, "clip": CLIP, "mode": "distributed"},
        "privacy.secure_aggregation": {},
    },
    "client z=0.1": {"privacy.client_dp": {"noise_multiplier": 0.1, "clip": CLIP}},
    "sample z=1": {"privacy.sample_dp": {"noise_multiplier": 1.0, "max_grad_norm": CLIP}},
}


def folder_name(label: str) -> str:
    return label.replace(" + ", "-").replace(" ", "-").replace("=", "")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The model, and for the tiny model (byte-level tokens) a longer max_length."""
    return {"model.name": args.model, **({"data.max_length": 256} if args.model == "tiny-random-llama" else {})}


def part1_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **model_overrides(args),
        "data.max_train_examples": args.train_examples,
        "federation.rounds": args.rounds,
        "federation.local_steps": args.local_steps,
        "federation.batch_size": 4,
        "federation.clients_per_round": 8,
        "federation.lr": args.lr,
        "federation.lr_schedule": "constant",
        "eval.every": args.rounds,
        "eval.at_start": False,
        "eval.generate": False,
        "eval.max_examples": 64,
        "federation.checkpoint_every": args.rounds,
    }


def audit(folder: Path, examples: int) -> dict[str, Any]:
    """``fedlm audit`` once per run folder; its audit.json."""
    if not (folder / "audit.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "fedlm.cli", "audit", str(folder), "--max-examples", str(examples)], check=True, stdout=subprocess.DEVNULL
        )
    return json.loads((folder / "audit.json").read_text())


def part1(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for label, privacy in SETTINGS.items():
        folder = args.out / "utility" / folder_name(label)
        if args.only_finished and not (folder / "adapter").is_dir():
            continue
        run_cli(folder, {**part1_overrides(args), **{k: json.dumps(v) for k, v in privacy.items()}})
        records = read_metrics(folder)
        final = max(r["round"] for r in records if r.get("split") == "global_test")
        loss = next(r["loss"] for r in records if r.get("split") == "global_test" and r["round"] == final)
        rounds = [r for r in records if r.get("split") == "aggregate"]
        eps_client = rounds[-1]["aggregation"].get("epsilon")
        eps_sample = max((r.get("sample_epsilon", 0.0) for r in records if r.get("split") == "train"), default=0.0) or None
        report = audit(folder, args.audit_examples)
        scores = {k: v for k, v in report.items() if isinstance(v, dict) and "auc" in v}
        best = max(scores, key=lambda k: scores[k]["auc"])
        rows.append(
            {
                "setting": label,
                "loss": loss,
                "epsilon_client": eps_client,
                "epsilon_sample": eps_sample,
                "auc": scores[best]["auc"],
                "auc_score": best,
                "tpr_at_1pct": scores[best].get("tpr_at_fpr_0.01"),
                "round_time_s": sum(r["train_time_s"] for r in rounds) / len(rounds),
            }
        )
    return rows


def part2(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in args.clients:
        k = None if n <= 10 else 2 * math.ceil(math.log2(n))
        base = {
            **model_overrides(args),
            "partition.method": "iid",
            "partition.num_clients": n,
            "partition.field": "null",
            "data.max_train_examples": 8 * n,
            "federation.rounds": 1,
            "federation.local_steps": args.overhead_steps,
            "federation.batch_size": args.overhead_batch,
            "federation.clients_per_round": n,
            "eval.every": 1,
            "eval.at_start": False,
            "eval.generate": False,
            "eval.max_examples": 8,
        }
        for secure in (False, True):
            work = "" if (args.overhead_steps, args.overhead_batch) == (1, 2) else f"{args.overhead_steps}x{args.overhead_batch}-"
            folder = args.out / "overhead" / f"{n}-{work}{'secagg' if secure else 'plain'}"
            if args.only_finished and not (folder / "adapter").is_dir():
                continue
            items = dict(base)
            if secure:
                items["privacy.secure_aggregation"] = json.dumps({"neighbours": k} if k else {})
            run_cli(folder, items)
            (agg,) = [r for r in read_metrics(folder) if r.get("split") == "aggregate"]
            m = agg["aggregation"]
            rows.append(
                {
                    "clients": n,
                    "local_work": f"{args.overhead_steps} x batch {args.overhead_batch}",
                    "secure": secure,
                    "neighbours": k if secure else None,
                    "round_time_s": agg["train_time_s"],
                    "protocol_s": (m.get("secagg_client_time_s", 0) + m.get("secagg_server_time_s", 0)) if secure else 0.0,
                    "aggregate_s": m["aggregate_time_s"],
                    "upload_bytes": agg["upload_bytes"],
                    "download_bytes": agg["download_bytes"],
                }
            )
    return rows


def fmt_eps(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def markdown(rows1: list[dict[str, Any]], rows2: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = []
    if rows1:
        lines += [
            f"Part 1: `{args.model}`, 8 WordNet-domain clients (all every round), {args.train_examples} training examples in "
            f"all, {args.rounds} rounds x {args.local_steps} local steps x batch 4, lr {args.lr}; loss on 64 test examples; "
            f"audit on {args.audit_examples} members vs {args.audit_examples} non-members (best of loss / zlib / Min-K%). "
            f"Client-level DP clips each update to {CLIP} and noises the sum; epsilon at delta 1e-5 with q = 8/8.",
            "",
            "| setting | test loss | epsilon (client-level) | epsilon (sample-level, worst client) | MIA AUC | TPR at 1% FPR | round time (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows1:
            tpr = "-" if r["tpr_at_1pct"] is None else f"{r['tpr_at_1pct']:.2f}"
            lines.append(
                f"| {r['setting']} | {r['loss']:.3f} | {fmt_eps(r['epsilon_client'])} | {fmt_eps(r['epsilon_sample'])} | "
                f"{r['auc']:.3f} ({r['auc_score']}) | {tpr} | {r['round_time_s']:.0f} |"
            )
    if rows2:
        lines += [
            "",
            f"Part 2: one round on `{args.model}`, every client's local steps as given; secure aggregation on the "
            "round's clients (bytes: all protocol messages, Flower-encoded, vs the plain safetensors upload).",
            "",
            "| clients | local steps | graph | round time plain (s) | round time SecAgg (s) | wall ratio | protocol compute (s) | all SecAgg work (s) | SecAgg work / plain round | bytes up+down plain (MiB) | bytes SecAgg (MiB) | bytes ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        by = {(r["clients"], r["local_work"], r["secure"]): r for r in rows2}
        for n, work, secure in sorted(by):
            if secure or (n, work, True) not in by:
                continue
            p, s = by[(n, work, False)], by[(n, work, True)]
            pb, sb = p["upload_bytes"] + p["download_bytes"], s["upload_bytes"] + s["download_bytes"]
            graph = "all pairs (SecAgg)" if s["neighbours"] is None else f"k = {s['neighbours']} (SecAgg+)"
            added = s["aggregate_s"] - p["aggregate_s"]  # encoding, the protocol (clients and server), decoding
            lines.append(
                f"| {n} | {work} | {graph} | {p['round_time_s']:.1f} | {s['round_time_s']:.1f} | {s['round_time_s'] / p['round_time_s']:.3f} | "
                f"{s['protocol_s']:.1f} | {added:.1f} | {added / p['round_time_s']:.1%} | {pb / 2**20:.1f} | {sb / 2**20:.1f} | {sb / pb:.3f} |"
            )
        lines += [
            "",
            "Round time includes every client's local training (sequential in the simulation). The protocol "
            "compute is key agreement, Shamir sharing, masks and unmasking (clients' and server's); all SecAgg work "
            "adds fixed-point encoding and decoding (the SecAgg run's aggregation time minus the plain run's). The "
            "wall ratio also carries the noise of a shared 2-core machine; the work column is what SecAgg adds.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--part", choices=["1", "2", "all"], default="all")
    parser.add_argument("--train-examples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--audit-examples", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="*", default=[10, 50, 100])
    parser.add_argument("--overhead-steps", type=int, default=1, help="part 2: local steps per client")
    parser.add_argument("--overhead-batch", type=int, default=2, help="part 2: batch size")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "privacy")
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--only-finished", action="store_true", help="report the finished runs only, start none")
    args = parser.parse_args()
    rows2 = []
    if args.part in ("2", "all"):
        settings = [(args.overhead_steps, args.overhead_batch)] + ([(1, 2), (2, 4)] if args.only_finished else [])
        for steps, batch in dict.fromkeys(settings):
            args.overhead_steps, args.overhead_batch = steps, batch
            rows2 += part2(args)
    rows1 = part1(args) if args.part in ("1", "all") else []
    publish(
        args.out, {"part1": rows1, "part2": rows2}, markdown(rows1, rows2, args), args.write_results, START, END, "Privacy (`benchmarks/privacy.py`)"
    )


if __name__ == "__main__":
    main()
