"""Communication benchmark: global-test loss against MiB sent (uploads + downloads of every client) for dense LoRA
(naive), FFA, heterogeneous ranks, top-k at 0.1 / 0.01 with and without error feedback, and 8 / 4 / 2-bit
quantization (2-bit also with one scale per 256 and per 1,024 entries instead of 64) (``compression.uplink`` and
``compression.downlink`` with the same codec), on the real default model and the embedded WordNet domains (8 clients,
4 per round), the aggregation benchmark's settings.

The bytes are what ``metrics.jsonl`` logs: the encoded messages' lengths. The goal checked: a compressed setting
whose final loss is within 1% of dense FedAvg-LoRA's with at least 10x fewer bytes, and FedKSeed under 10 KB per
client per round (up + down, with its seed-wise downlink). ``--only NAME ...`` runs a subset (a reduced grid);
``--write-results`` puts the table into ``benchmarks/RESULTS.md``. Smoke: ``--model tiny-random-llama --rounds 1``.
Run under ``flock /tmp/fedlm-heavy.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

import torch
from common import HERE, add_only, arm_parser, chosen, publish, read_metrics, run_arms

START, END = "<!-- communication:start -->", "<!-- communication:end -->"
HETERO = [2, 4, 8, 2, 4, 8, 4, 8]


def _both(codec: dict[str, Any]) -> dict[str, Any]:
    return {"compression.uplink": codec, "compression.downlink": {k: v for k, v in codec.items() if k != "error_feedback"}}


#: name -> overrides on top of the shared settings
SETTINGS: dict[str, dict[str, Any]] = {
    "dense-naive": {},
    "dense-ffa": {"aggregation.lora": "ffa"},
    "dense-hetero": {"peft.client_ranks": HETERO},
    "topk0.1-ef": _both({"method": "topk", "ratio": 0.1, "error_feedback": True}),
    "topk0.1-noef": _both({"method": "topk", "ratio": 0.1, "error_feedback": False}),
    "topk0.01-ef": _both({"method": "topk", "ratio": 0.01, "error_feedback": True}),
    "topk0.01-noef": _both({"method": "topk", "ratio": 0.01, "error_feedback": False}),
    "quantize8": _both({"method": "quantize", "bits": 8}),
    "quantize4": _both({"method": "quantize", "bits": 4}),
    "quantize2": _both({"method": "quantize", "bits": 2}),
    "quantize2-block256": _both({"method": "quantize", "bits": 2, "block_size": 256}),
    "quantize2-block1024": _both({"method": "quantize", "bits": 2, "block_size": 1024}),
    "fedkseed": {"federation.algorithm": "fedkseed", "federation.lr": 1e-4},
}


def overrides(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The aggregation benchmark's settings (fedavg, 4 clients per round, loss-only evaluation every round) plus the
    setting's own."""
    items: dict[str, Any] = {
        "model.name": args.model,
        "federation.rounds": args.rounds,
        "federation.local_steps": args.local_steps,
        "federation.clients_per_round": 4,
        "federation.checkpoint_every": args.rounds,
        "eval.every": 1,
        "eval.generate": False,
        "eval.max_examples": args.eval_examples,
        **SETTINGS[name],
    }
    if args.model == "tiny-random-llama":
        items["data.max_length"] = 256
    return items


def summarise(folder: Path, name: str) -> dict[str, Any]:
    """Loss per round and cumulative MiB (up + down) per round of one run."""
    records = read_metrics(folder)
    test = {r["round"]: r["loss"] for r in records if r.get("split") == "global_test"}
    rounds = sorted((r for r in records if r.get("split") == "aggregate"), key=lambda r: r["round"])
    mib, total = [], 0.0
    for r in rounds:
        total += (r["upload_bytes"] + r["download_bytes"]) / 2**20
        mib.append(total)
    train = [r for r in records if r.get("split") == "train"]
    per_client_round = sum(r["upload_bytes"] + r["download_bytes"] for r in train) / max(len(train), 1)
    upload = sum(r["upload_bytes"] for r in train) / max(len(train), 1)
    return {
        "run": name,
        "loss": [test[k] for k in sorted(test)],
        "mib": mib,
        "kb_per_client_round": per_client_round / 1000,
        "upload_kb_per_client_round": upload / 1000,
    }


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The markdown table, with each run's bytes and loss relative to dense naive LoRA when it was run."""
    base = next((r for r in rows if r["run"] == "dense-naive"), None)
    lines = [
        f"Model `{args.model}` (float32 on cpu, {platform.machine()}, {torch.get_num_threads()} threads), embedded WordNet definitions split by domain (8 clients, 4 per round), "
        f"{args.rounds} rounds x {args.local_steps} local steps x batch 8, fedavg, seed 0; global-test loss on {args.eval_examples} held-out examples. "
        "MiB: every client's uploads + downloads as logged (the encoded messages' lengths). Compressed rows compress both directions with the same "
        "codec (the downlink always with the server's error feedback). Regenerate: `flock /tmp/fedlm-heavy.lock python benchmarks/communication.py "
        "--write-results`.",
        "",
        "| run | test loss per round (0..R) | MiB total | KB per client per round (upload) | bytes vs dense | final loss vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{base['mib'][-1] / r['mib'][-1]:.1f}x fewer" if base else "-"
        loss = f"{100 * (r['loss'][-1] / base['loss'][-1] - 1):+.2f}%" if base else "-"
        lines.append(
            f"| {r['run']} | {' / '.join(f'{x:.3f}' for x in r['loss'])} | {r['mib'][-1]:.2f} | {r['kb_per_client_round']:.1f} ({r['upload_kb_per_client_round']:.2f}) | {ratio} | {loss} |"
        )
    missing = [name for name in SETTINGS if name not in {r["run"] for r in rows}]
    if missing:
        lines += ["", f"Not measured in this run (reduced grid): {', '.join(missing)}."]
    if base:
        good = [r["run"] for r in rows if r is not base and r["loss"][-1] <= 1.01 * base["loss"][-1] and base["mib"][-1] >= 10 * r["mib"][-1]]
        lines += ["", f"Within 1% of dense FedAvg-LoRA's final loss with >= 10x fewer bytes: {', '.join(good) or 'none of the settings run'}."]
    return "\n".join(lines)


def main() -> None:
    parser = arm_parser(__doc__, HERE / "runs" / "communication", rounds=3, local_steps=3)
    add_only(parser, SETTINGS)
    args = parser.parse_args()
    names = chosen(parser, args.only, SETTINGS, "settings")
    rows = run_arms(args.out, {name: overrides(args, name) for name in names}, lambda folder, name, _seconds: summarise(folder, name))
    publish(args.out, rows, table(rows, args), args.write_results, START, END, "Communication (`benchmarks/communication.py`)")


if __name__ == "__main__":
    main()
