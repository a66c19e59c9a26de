"""Robustness benchmark: every attack x every defence (including none) with 1 and 2 malicious clients of 8.

Each cell is one ``fedlm run`` on the quickstart config (real default model, embedded WordNet data, 8 domain
clients, all of them every round) with the same seed and steps. Reported per cell: the clean metric (final
global-test loss; "within 10%" means at most 1.1x FedAvg's loss without attack) and, for the backdoor, the attack
success rate on triggered test prompts. Each defence's cost is its mean round time
without attack relative to FedAvg's. ``norm_bound``'s threshold is calibrated on a clean run (the median client
update norm, as Sun et al. 2019 tune it to benign norms).

Runs are resumable (a finished run folder is reused), so the matrix can be filled over several sessions:
``python benchmarks/robustness.py [--only-attacks ...] [--only-defences ...] [--write-results]``.
Smoke: ``--model tiny-random-llama --rounds 1 --local-steps 1``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from common import HERE, read_metrics, run_cli, write_results_block

START, END = "<!-- robustness:start -->", "<!-- robustness:end -->"
ATTACKERS = {1: ["noun.artifact"], 2: ["noun.artifact", "verb.motion"]}
ATTACKS: dict[str, dict[str, Any]] = {
    "sign_flip": {"scale": 1.0},
    "scaling": {"factor": 8.0},  # n / server_lr with n = 8: model replacement (Bagdasaryan et al. 2020)
    "gaussian_noise": {"std": 0.01, "replace": True},
    "alie": {},
    "ipm": {"epsilon": 0.5},
    "backdoor": {"poison_fraction": 0.5},
}
DEFENCES: dict[str, dict[str, Any]] = {
    "fedavg": {}, "median": {}, "trimmed_mean": {"beta": 0.25}, "multikrum": {"num_malicious": 2},
    "norm_bound": {}, "flame": {}, "fltrust": {"root_size": 64},
}


def base_overrides(args: argparse.Namespace) -> dict[str, Any]:
    items: dict[str, Any] = {
        "model.name": args.model, "federation.rounds": args.rounds, "federation.local_steps": args.local_steps,
        "federation.clients_per_round": 8, "federation.lr_schedule": "constant", "eval.every": args.rounds,
        "eval.at_start": False, "eval.generate": False, "eval.max_examples": args.eval_examples, "eval.max_new_tokens": 12,
        "federation.checkpoint_every": args.rounds,
    }
    if args.model == "tiny-random-llama":
        items["data.max_length"] = 256
    return items


def calibrate_norm_bound(args: argparse.Namespace) -> float:
    """The median client update norm of a clean run (norm_bound with an unreachable threshold)."""
    folder = args.out / "calibrate-norm_bound"
    run_cli(folder, {**base_overrides(args), "aggregation.name": "norm_bound", "aggregation.max_norm": 1e12})
    rounds = [r for r in read_metrics(folder) if r.get("split") == "aggregate"]
    return statistics.median(r["aggregation"]["update_norm_median"] for r in rounds)


def cell(args: argparse.Namespace, defence: str, attack: str | None, count: int, max_norm: float) -> dict[str, Any]:
    """Run (or reuse) one cell and read its outcome."""
    name = f"{defence}-{attack or 'none'}-{count if attack else 0}"
    items = {**base_overrides(args), "aggregation.name": defence}
    params = {**DEFENCES[defence], **({"max_norm": max_norm} if defence == "norm_bound" else {})}
    items.update({f"aggregation.{k}": v for k, v in params.items()})
    if attack is not None:
        items["attack.name"], items["attack.clients"] = attack, ATTACKERS[count]
        items.update({f"attack.{k}": v for k, v in ATTACKS[attack].items()})
    folder = args.out / name
    run_cli(folder, items)
    records = read_metrics(folder)
    final = max(r["round"] for r in records if r.get("split") == "global_test")
    loss = next(r["loss"] for r in records if r.get("split") == "global_test" and r["round"] == final)
    asr = [r["attack_success_rate"] for r in records if r.get("split") == "backdoor_test" and r["round"] == final]
    rounds = [r for r in records if r.get("split") == "aggregate"]
    caught = sum(len(r.get("attack", {}).get("excluded_malicious", [])) for r in rounds)
    return {"defence": defence, "attack": attack or "none", "malicious": count if attack else 0, "loss": loss,
            "asr": asr[0] if asr else None, "round_time_s": statistics.mean(r["train_time_s"] for r in rounds),
            "attackers_excluded": caught, "attacker_rounds": count * len(rounds) if attack else 0}


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, max_norm: float) -> str:
    by = {(r["defence"], r["attack"], r["malicious"]): r for r in results}
    defences = [d for d in DEFENCES if (d, "none", 0) in by]
    clean_fedavg = by.get(("fedavg", "none", 0), {}).get("loss")
    lines = [
        f"Model `{args.model}`, WordNet domains (8 clients, all every round), {args.rounds} rounds x {args.local_steps} "
        f"local steps x batch 8, seed 0; global-test loss on {args.eval_examples} examples (lower is better) / backdoor "
        f"attack success rate. norm_bound threshold {max_norm:.4g} (median clean update norm).",
        "", "| attack | malicious | " + " | ".join(defences) + " |", "|---|---|" + "---|" * len(defences),
    ]
    for attack in ["none", *ATTACKS]:
        for count in ([0] if attack == "none" else [1, 2]):
            cells = []
            for d in defences:
                r = by.get((d, attack, count))
                if r is None:
                    cells.append("-")
                    continue
                text = f"{r['loss']:.3f}" + (f" / ASR {r['asr']:.2f}" if r["asr"] is not None else "")
                if clean_fedavg and r["loss"] <= 1.1 * clean_fedavg:
                    text += " ok"
                cells.append(text)
            lines.append(f"| {attack} | {count}/8 | " + " | ".join(cells) + " |")
    base = by.get(("fedavg", "none", 0))
    if base:
        lines += ["", "Cost of each defence (mean round time without attack, relative to FedAvg): " + ", ".join(
            f"{d} {by[(d, 'none', 0)]['round_time_s'] / base['round_time_s']:.2f}x" for d in defences)]
    lines += ["", "`ok`: clean loss within 10% of FedAvg without attack."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--only-attacks", nargs="*")
    parser.add_argument("--only-defences", nargs="*")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "robustness")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    max_norm = calibrate_norm_bound(args)
    results = []
    for defence in args.only_defences or DEFENCES:
        results.append(cell(args, defence, None, 0, max_norm))
        for attack in args.only_attacks or ATTACKS:
            for count in (1, 2):
                results.append(cell(args, defence, attack, count, max_norm))
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    text = markdown(results, args, max_norm)
    print(text)
    if args.write_results:
        write_results_block(START, END, "Robustness (`benchmarks/robustness.py`)", text)


if __name__ == "__main__":
    main()
