"""Offsite-tuning benchmark: federated LoRA trained on a compressed emulator (``offsite``; Xiao et al. 2023) against
full-model federated LoRA with the same steps, on the real default model and the embedded WordNet domains (the
quickstart's 8 clients, 4 per round).

Arms: ``full-lora`` (LoRA on every layer of the full model, the baseline); ``offsite-1.0`` (the emulator keeps every
layer: LoRA on the 2 bottom and 2 top layers only, which isolates the cost of restricting the adapter);
``offsite-0.5`` and ``offsite-0.25`` (uniform layer drop to half / a quarter of the 26 middle layers, distilled for
``--distill-steps`` steps on the embedded WordNet text); ``fedbiot-0.25`` (0.25 with FedBiOT's alignment,
``--align-steps`` per round; Wu et al. 2024). Reported per arm: the full model's final global-test loss (the
plugged-in adapter), the emulator's loss with the same adapter and the plug-in gap (emulator minus full), the model
bytes each client receives (emulator vs full model) and in total, and the wall time.

``--write-results`` puts the table into ``benchmarks/RESULTS.md``. Smoke: ``--model tiny-random-llama-8l --rounds 1
--local-steps 1 --distill-steps 2 --align-steps 1 --eval-examples 8 --out /tmp/offsite-smoke``. Run under
``flock /tmp/fedlm-heavy.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

from common import HERE, add_only, arm_parser, chosen, publish, read_metrics, run_arms

START, END = "<!-- offsite:start -->", "<!-- offsite:end -->"

#: name -> offsite settings (None: full-model federated LoRA)
ARMS: dict[str, dict[str, Any] | None] = {
    "full-lora": None,
    "offsite-1.0": {"keep_ratio": 1.0},
    "offsite-0.5": {"keep_ratio": 0.5},
    "offsite-0.25": {"keep_ratio": 0.25},
    "fedbiot-0.25": {"keep_ratio": 0.25, "align": True},
}


def overrides(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The quickstart's federation with a loss-only evaluation every round, plus the arm's ``offsite`` section."""
    items: dict[str, Any] = {
        "model.name": args.model,
        "federation.rounds": args.rounds,
        "federation.local_steps": args.local_steps,
        "federation.checkpoint_every": args.rounds,
        "eval.every": 1,
        "eval.generate": False,
        "eval.max_examples": args.eval_examples,
    }
    if args.model.startswith("tiny-random-llama"):
        items["data.max_length"] = 256  # its byte-level tokenizer
    arm = ARMS[name]
    if arm is not None:
        items["offsite"] = {
            "n_bottom": 2,
            "n_top": 2,
            "keep_ratio": arm["keep_ratio"],
            "emulator_distill_steps": args.distill_steps if arm["keep_ratio"] < 1.0 else 0,
            "align_steps": args.align_steps if arm.get("align") else 0,
        }
    return items


def summarise(folder: Path, name: str, seconds: float) -> dict[str, Any]:
    """Final losses, plug-in gap and bytes of one run."""
    records = read_metrics(folder)
    full = {r["round"]: r["loss"] for r in records if r.get("split") == "global_test"}
    emulator = {r["round"]: r for r in records if r.get("split") == "emulator_test"}
    offsite = next((r for r in records if r.get("split") == "offsite"), None)
    rounds = sorted((r for r in records if r.get("split") == "aggregate"), key=lambda r: r["round"])
    clients = {c for r in rounds for c in r.get("clients", [])}
    last = max(full)
    return {
        "run": name,
        "loss": [full[k] for k in sorted(full)],
        "emulator_loss": emulator[last]["loss"] if last in emulator else None,
        "plugin_gap": emulator[last].get("plugin_gap") if last in emulator else None,
        "kept_layers": offsite["kept_layers"] if offsite else None,
        "emulator_bytes": offsite["emulator_bytes"] if offsite else None,
        "full_bytes": offsite["full_bytes"] if offsite else None,
        "middle_mse": (offsite["middle_mse_before"], offsite["middle_mse_after"]) if offsite else None,
        "model_download_bytes": sum(r["offsite"]["model_download_bytes"] for r in rounds) if offsite else None,
        "clients": len(clients),
        "adapter_mib": sum(r["upload_bytes"] + r["download_bytes"] for r in rounds) / 2**20,
        "seconds": seconds,
    }


def _mib(value: float | None) -> str:
    return f"{value / 2**20:.1f}" if value is not None else "-"


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The markdown table; the full model's bytes (from any offsite arm) stand in for the baseline's."""
    full_bytes = next((r["full_bytes"] for r in rows if r["full_bytes"]), None)
    base = next((r for r in rows if r["run"] == "full-lora"), None)
    lines = [
        f"Model `{args.model}` (float32 on cpu, {platform.machine()}, 2 threads), embedded WordNet definitions split by domain (8 clients, 4 per "
        f"round), {args.rounds} rounds x {args.local_steps} local steps x batch 8, LoRA r=8 on q/k/v/o, fedavg, seed 0; loss on {args.eval_examples} "
        f"held-out examples. Offsite arms: 2 bottom + 2 top adapter layers, the middle distilled for {args.distill_steps} steps (batch 4) on "
        f"`embedded:wordnet_text`; fedbiot: + {args.align_steps} alignment steps per round. Model MiB: the frozen weights each client receives "
        "once (the emulator, or the full model), and their total over the clients that took part (+ the re-sent middle under fedbiot). "
        "Plug-in gap: the emulator's loss minus the full model's, with the same final adapter (> 0: the plugged-in full model is better). "
        "Regenerate: `flock /tmp/fedlm-heavy.lock python benchmarks/offsite.py --write-results`.",
        "",
        "| run | kept layers | full-model loss per round (0..R) | final vs full-lora | emulator loss | plug-in gap | model MiB per client | model MiB total | adapter MiB | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_client = r["emulator_bytes"] if r["emulator_bytes"] is not None else full_bytes
        total = r["model_download_bytes"] if r["model_download_bytes"] is not None else (full_bytes * r["clients"] if full_bytes else None)
        versus = f"{100 * (r['loss'][-1] / base['loss'][-1] - 1):+.2f}%" if base else "-"
        kept = len(r["kept_layers"]) if r["kept_layers"] else "all"
        emu = f"{r['emulator_loss']:.4f}" if r["emulator_loss"] is not None else "-"
        gap = f"{r['plugin_gap']:+.4f}" if r["plugin_gap"] is not None else "-"
        lines.append(
            f"| {r['run']} | {kept} | {' / '.join(f'{x:.3f}' for x in r['loss'])} | {versus} | {emu} | {gap} | {_mib(per_client)} | {_mib(total)} "
            f"| {r['adapter_mib']:.2f} | {r['seconds']:.0f} |"
        )
    missing = [name for name in ARMS if name not in {r["run"] for r in rows}]
    if missing:
        lines += ["", f"Not measured in this run: {', '.join(missing)}."]
    return "\n".join(lines)


def main() -> None:
    parser = arm_parser(__doc__, HERE / "runs" / "offsite", rounds=4, local_steps=5)
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--align-steps", type=int, default=10)
    add_only(parser, ARMS)
    args = parser.parse_args()
    names = chosen(parser, args.only, ARMS, "arms")
    rows = run_arms(args.out, {name: overrides(args, name) for name in names}, summarise)
    publish(args.out, rows, table(rows, args), args.write_results, START, END, "Offsite-tuning (`benchmarks/offsite.py`)")


if __name__ == "__main__":
    main()
