"""Heterogeneity benchmark: what each aggregator and LoRA mode makes of non-IID clients at an equal budget.

On SmolLM2-135M-Instruct and the embedded WordNet definitions, split one domain per client (``by_field``) or by a
Dirichlet(alpha = 0.1) draw over the domains, every arm gets the same optimizer steps and examples: each sampled
client runs ``rounds x local_steps`` = the same total steps at the same batch size, whatever the schedule. Arms:

- baselines (``fedlm compare`` on the same config): base, centralized (the union of the clients' data for the
  federation's total steps) and local-only (each client alone for its federated steps);
- federated: every aggregator with ``naive`` LoRA, FedAvg with every LoRA mode (naive, exact, ffa, fedex, flora,
  rolora), SCAFFOLD, and the adaptive server optimisers (FedAdagrad, FedAdam, FedYogi) with the server learning rate
  ``aggregation.eta`` swept;
- schedules: local steps 1 / 5 / 20 per round at the same total steps (the client-drift trade-off).

Reported per arm: final global-test loss and exact match, each client's test loss, the ratio to centralized, the
bytes on the wire, and plots of the global-test loss against the round and against the cumulative bytes.

``--quick`` runs a reduced grid (one partition, one schedule, the LoRA modes with FedAvg and SCAFFOLD, loss only) that
fits a 2-core CPU in about half an hour; the full grid is hours. ``--write-results`` puts the table into
``benchmarks/RESULTS.md`` and the plot into ``benchmarks/heterogeneity.png``. Smoke: ``--quick --model
tiny-random-llama``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import HERE, QUICKSTART, read_metrics, run_cli, write_results_block

START, END = "<!-- heterogeneity:start -->", "<!-- heterogeneity:end -->"
TOTAL_STEPS = 60  # optimizer steps per sampled client per run, whatever the schedule (full grid)
PARTITIONS: dict[str, dict[str, Any]] = {
    "domain": {"partition.method": "by_field", "partition.field": "domain"},
    "dirichlet0.1": {"partition.method": "dirichlet", "partition.field": "domain", "partition.alpha": 0.1, "partition.num_clients": 8},
}
LORA_MODES = ["naive", "exact", "ffa", "fedex", "flora", "rolora"]
ADAPTIVE = ["fedadagrad", "fedadam", "fedyogi"]
SERVER_LRS = [0.001, 0.01, 0.1]


@dataclass(frozen=True)
class Arm:
    """One federated run of the grid."""

    partition: str
    local_steps: int
    rounds: int
    aggregator: str
    lora: str
    eta: float | None = None
    clients_per_round: int = 4

    @property
    def name(self) -> str:
        eta = f"-eta{self.eta:g}" if self.eta is not None else ""
        cohort = f"-c{self.clients_per_round}" if self.clients_per_round != 4 else ""
        return f"{self.partition}-k{self.local_steps}-{self.aggregator}-{self.lora}{eta}{cohort}"


def grid(quick: bool) -> list[Arm]:
    """The arms of the full grid, or of ``--quick``'s reduced one."""
    if quick:
        order = ["naive", "fedex", "rolora", "flora", "exact", "ffa"]  # the new modes first, for a run cut short
        methods: list[tuple[str, str, float | None]] = [("fedavg", mode, None) for mode in order] + [("scaffold", "naive", None)]
        # the same 60 client steps as 2 clients x 6 rounds: twice the sequential steps (the round count trade-off)
        return [Arm("domain", 5, 3, agg, mode, eta) for agg, mode, eta in methods] + [Arm("domain", 5, 6, "fedavg", "naive", None, 2)]
    methods = [(agg, "naive", None) for agg in ("fedavg", "fedavgm", "fedprox", "scaffold")]
    methods += [("fedavg", mode, None) for mode in LORA_MODES if mode != "naive"]
    methods += [(agg, "naive", eta) for agg in ADAPTIVE for eta in SERVER_LRS]
    return [Arm(p, k, TOTAL_STEPS // k, agg, mode, eta) for p in PARTITIONS for k in (1, 5, 20) for agg, mode, eta in methods]


def overrides(args: argparse.Namespace, arm: Arm) -> dict[str, Any]:
    """Settings on top of the quickstart config."""
    items: dict[str, Any] = {
        "model.name": args.model,
        **PARTITIONS[arm.partition],
        "federation.rounds": arm.rounds,
        "federation.local_steps": arm.local_steps,
        "federation.clients_per_round": arm.clients_per_round,
        "federation.checkpoint_every": arm.rounds,
        "eval.every": max(1, arm.rounds // 3),
        "eval.generate": args.generate,
        "eval.max_examples": args.eval_examples,
        "aggregation.name": arm.aggregator,
        "aggregation.lora": arm.lora,
    }
    if arm.eta is not None:
        items["aggregation.eta"] = arm.eta
    if args.model == "tiny-random-llama":
        items["data.max_length"] = 256  # its byte tokenizer needs longer sequences
    return items


def summarise(folder: Path, arm: Arm) -> dict[str, Any]:
    """Per-round global-test loss, cumulative bytes, and the final global and per-client metrics of a run."""
    records = read_metrics(folder)
    evals = [r for r in records if r.get("split") == "global_test"]
    rounds = sorted((r for r in records if r.get("split") == "aggregate"), key=lambda r: r["round"])
    sent: dict[int, float] = {0: 0.0}
    total = 0.0
    for r in rounds:
        total += (r["download_bytes"] + r["upload_bytes"]) / 2**20
        sent[r["round"]] = total
    last = max(r["round"] for r in evals)
    final = next(r for r in evals if r["round"] == last)
    clients = {
        r["split"].removeprefix("client_").removesuffix("_test"): r["loss"]
        for r in records
        if r.get("round") == last and str(r.get("split", "")).startswith("client_")
    }
    return {
        "run": arm.name,
        **{k: v for k, v in arm.__dict__.items()},
        "curve": [(r["round"], r["loss"], sent.get(r["round"], total)) for r in sorted(evals, key=lambda r: r["round"])],
        "loss": final["loss"],
        "exact_match": final.get("exact_match"),
        "client_loss": clients,
        "mib": total,
        "cross_term": [r["aggregation"].get("fedex_cross_term") for r in rounds if "fedex_cross_term" in r["aggregation"]],
    }


def baselines(args: argparse.Namespace, partition: str, local_steps: int, rounds: int) -> dict[str, Any] | None:
    """``fedlm compare`` (base, local-only, centralized, federated FedAvg) on the schedule; its comparison.json."""
    folder = args.out / f"compare-{partition}-k{local_steps}"
    if not (folder / "comparison.json").is_file():
        arm = Arm(partition, local_steps, rounds, "fedavg", "naive")
        cmd = [sys.executable, "-m", "fedlm.cli", "compare", str(QUICKSTART), "--overwrite", "--set", f"output_dir={folder}"]
        for key, value in overrides(args, arm).items():
            cmd += ["--set", f"{key}={value}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((folder / "comparison.json").read_text())


def _centralized_loss(comparison: dict[str, Any] | None) -> float | None:
    if comparison is None:
        return None
    for row in comparison["global_test"]:
        if row.get("method") == "centralized":
            return row.get("loss")
    return None


def per_client_ratio(comparison: dict[str, Any] | None, client_loss: dict[str, float]) -> float | None:
    """The issue's measure: centralized / federated mean loss over the clients' own test shares (``None`` without
    baselines or when the comparison scored the clients by another metric)."""
    if comparison is None or comparison.get("per_client_metric") != "loss" or not client_loss:
        return None
    central = {row["client"]: row["centralized"] for row in comparison["per_client"]}
    shared = [c for c in client_loss if central.get(c) is not None]
    return sum(central[c] for c in shared) / sum(client_loss[c] for c in shared) if shared else None


def results_markdown(runs: list[dict[str, Any]], comparisons: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Model `{args.model}`, `model.dtype: auto` (float32 on a CPU without bf16 matrix units, as here), "
        f"embedded WordNet definitions, 8 clients, 4 per round (2 for a run named -c2), batch 8, lr 0.002 cosine, seed 0; global-test loss on "
        f"{args.eval_examples} held-out examples (lower is better). Grid: {'quick' if args.quick else 'full'}. "
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads. "
        f"Regenerate: `python benchmarks/heterogeneity.py {'--quick ' if args.quick else ''}--write-results`.",
        "",
        "| run | aggregator | LoRA mode | local steps x rounds x clients | final loss | centralized / federated loss (global; mean per client) | exact match | worst client loss | MiB total | FedEx cross-term share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        comparison = comparisons.get(f"{r['partition']}-k{r['local_steps']}")
        central, per_client = _centralized_loss(comparison), per_client_ratio(comparison, r["client_loss"])
        ratio = f"{central / r['loss']:.3f}; {per_client:.3f}" if central and per_client else "-"
        worst = max(r["client_loss"].values()) if r["client_loss"] else None
        em = f"{r['exact_match']:.3f}" if r["exact_match"] is not None else "-"
        cross = ", ".join(f"{x:.2f}" for x in r["cross_term"]) or "-"
        eta = "" if r["eta"] is None else f" (eta {r['eta']:g})"
        lines.append(
            f"| {r['run']} | {r['aggregator']}{eta} | {r['lora']} | "
            f"{r['local_steps']} x {r['rounds']} x {r['clients_per_round']} | {r['loss']:.3f} | {ratio} | {em} | {'-' if worst is None else f'{worst:.3f}'} | "
            f"{r['mib']:.1f} | {cross} |"
        )
    lines += _baseline_lines(comparisons)
    lines += ["", "![global-test loss against rounds and bytes](heterogeneity.png)"]
    return "\n".join(lines)


def _baseline_lines(comparisons: dict[str, Any]) -> list[str]:
    """The ``fedlm compare`` arms (global-test loss) per (partition, schedule), when they were run."""
    if not comparisons:
        return ["", "Baselines (centralized, local-only) not run in this grid (`--baselines`)."]
    lines = [
        "",
        "Baselines (`fedlm compare`, same config and budget):",
        "",
        "| partition, schedule | method | loss | exact match |",
        "|---|---|---|---|",
    ]
    for key, comparison in comparisons.items():
        for row in comparison["global_test"]:
            em = row.get("exact_match")
            lines.append(f"| {key} | {row['method']} | {row['loss']:.3f} | {'-' if em is None else f'{em:.3f}'} |")
    return lines


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.get_cmap("tab20").colors
    for i, r in enumerate(runs):
        rounds, losses, mib = zip(*r["curve"])
        axes[0].plot(rounds, losses, marker="o", label=r["run"], color=colours[i % 20])
        axes[1].plot(mib, losses, marker="o", label=r["run"], color=colours[i % 20])
    axes[0].set(xlabel="round", ylabel="global-test loss", title="Loss per round")
    axes[1].set(xlabel="MiB on the wire (cumulative, down + up)", ylabel="global-test loss", title="Loss per byte")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the reduced grid")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--generate", action="store_true", help="score exact match by generation (slow on CPU)")
    parser.add_argument("--baselines", action="store_true", help="also run `fedlm compare` for each (partition, schedule)")
    parser.add_argument("--only", nargs="*", help="run names to run (default: the whole grid)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "heterogeneity")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    runs = []
    for arm in grid(args.quick):
        if args.only and arm.name not in args.only:
            continue
        folder = args.out / arm.name
        run_cli(folder, overrides(args, arm))
        runs.append(summarise(folder, arm))
    comparisons: dict[str, Any] = {}
    if args.baselines:
        for partition, k, rounds in sorted({(a.partition, a.local_steps, a.rounds) for a in grid(args.quick) if a.clients_per_round == 4}):
            comparisons[f"{partition}-k{k}"] = baselines(args, partition, k, rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"runs": runs, "baselines": comparisons}, indent=1))
    markdown = results_markdown(runs, comparisons, args)
    print(markdown)
    if args.write_results and runs:
        plot(runs, HERE / "heterogeneity.png")
        write_results_block(START, END, "Heterogeneity (`benchmarks/heterogeneity.py`)", markdown)


if __name__ == "__main__":
    main()
