"""Robustness benchmark: every attack x every defence (including none) with 1 and 2 malicious clients of 8.

Each cell is one ``fedlm run`` on the quickstart config (real default model, embedded WordNet data, 8 domain
clients, all of them every round) with the same seed and steps. Reported per cell: the clean metric (final
global-test loss; "within 10%" means at most 1.1x FedAvg's loss without attack) and, for the backdoor, the attack
success rate on triggered test prompts (the backdoor is boosted by n / server_lr = 8, Bagdasaryan et al.'s model
replacement, since an unboosted 1-of-8 backdoor does not take hold in a few rounds). Each defence's cost is its mean
server-side aggregation time (``aggregate_time_s``) without attack, next to FedAvg's; wall round time is also given
but is dominated by local training. ``norm_bound``'s threshold is calibrated on a clean run (the median client
update norm, as Sun et al. 2019 tune it to benign norms).

``--backdoor-study`` runs the backdoor alone at 2 of 8 against every defence with a larger budget (3 rounds, honest
clients 2 local steps, attackers 10 (``attack.local_steps``); its own folder and RESULTS.md section). In the
matrix's 2 x 2 steps the backdoor lowers the target's loss but never flips a generated answer, so the ASR criterion
there passes trivially; the study makes it take hold undefended, so that what each defence buys shows in the ASR.

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

from common import HERE, publish, read_metrics, run_cli

START, END = "<!-- robustness:start -->", "<!-- robustness:end -->"
STUDY_START, STUDY_END = "<!-- robustness-backdoor:start -->", "<!-- robustness-backdoor:end -->"
ATTACKERS = {1: ["noun.artifact"], 2: ["noun.artifact", "verb.motion"]}
ATTACKS: dict[str, dict[str, Any]] = {
    "sign_flip": {"scale": 1.0},
    "scaling": {"factor": 8.0},  # n / server_lr with n = 8: model replacement (Bagdasaryan et al. 2020)
    "gaussian_noise": {"std": 0.01, "replace": True},
    "alie": {},
    "ipm": {"epsilon": 0.5},
    "backdoor": {"poison_fraction": 0.5, "boost": 8.0},
    "corrupt_responses": {},
    "safety": {"mix": 1.0},
}
#: The study's backdoor: the matrix's, with attackers that train 5x the honest clients' steps (Bagdasaryan et al.
#: 2020, Sec. 4). Tried first, at 4 rounds x 4 steps for everyone: half the records poisoned moved the undefended
#: target NLL from 3.20 to 1.09 (clean loss +18%) yet greedy answers stayed definitions (ASR 0); all poisoned with
#: boost 8 wrecked the model (global test loss 11.6) and still no target answer.
STUDY_BACKDOOR = {"poison_fraction": 0.5, "boost": 8.0, "local_steps": 10}
FULL_MATRIX = ["sign_flip", "scaling", "gaussian_noise", "alie", "ipm", "backdoor"]  # the others on request
DEFENCES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "median": {},
    "trimmed_mean": {"beta": 0.25},
    "multikrum": {"num_malicious": 2},
    "norm_bound": {},
    "flame": {},
    "fltrust": {"root_size": 64},
}


def base_overrides(args: argparse.Namespace) -> dict[str, Any]:
    items: dict[str, Any] = {
        "model.name": args.model,
        "federation.rounds": args.rounds,
        "federation.local_steps": args.local_steps,
        "federation.clients_per_round": 8,
        "federation.batch_size": args.batch_size,
        "federation.lr_schedule": "constant",
        "eval.every": args.rounds,
        "eval.at_start": False,
        "eval.generate": False,
        "eval.max_examples": args.eval_examples,
        "eval.max_new_tokens": 12,
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


def clean_target_loss(args: argparse.Namespace) -> float | None:
    """The backdoor target's loss on the triggered test prompts under the clean FedAvg model (no attack): the level
    a backdoor starts from. Cached in ``out/clean_target_loss.json``; None until both runs exist."""
    cache = args.out / "clean_target_loss.json"
    if cache.is_file():
        return float(json.loads(cache.read_text())["target_loss"])
    attacked, clean = args.out / "fedavg-backdoor-2", args.out / "fedavg-none-0"
    if not (attacked / "adapter").is_dir() or not (clean / "adapter").is_dir():
        return None
    from safetensors.torch import load_file  # noqa: PLC0415 - only here: the other cells run in subprocesses

    from fedlm.config.io import load_config  # noqa: PLC0415
    from fedlm.experiment import build_session  # noqa: PLC0415
    from fedlm.reporting.progress import RunConsole  # noqa: PLC0415

    session = build_session(load_config(str(attacked / "config.yaml")), RunConsole(quiet=True))
    state = load_file(str(sorted((clean / "checkpoints").iterdir())[-1] / "global_adapter.safetensors"))
    loss = float(session.backdoor_probe(None).evaluate(state, 0)[0]["target_loss"])
    cache.write_text(json.dumps({"target_loss": loss}))
    return loss


def cell(args: argparse.Namespace, defence: str, attack: str | None, count: int, max_norm: float) -> dict[str, Any] | None:
    """Run (or reuse) one cell and read its outcome (``None``: not run yet and ``--cached-only``)."""
    name = f"{defence}-{attack or 'none'}-{count if attack else 0}"
    items = {**base_overrides(args), "aggregation.name": defence}
    params = {**DEFENCES[defence], **({"max_norm": max_norm} if defence == "norm_bound" else {})}
    items.update({f"aggregation.{k}": v for k, v in params.items()})
    if attack is not None:
        items["attack.name"], items["attack.clients"] = attack, ATTACKERS[count]
        params = STUDY_BACKDOOR if args.backdoor_study and attack == "backdoor" else ATTACKS[attack]
        items.update({f"attack.{k}": v for k, v in params.items()})
    folder = args.out / name
    if args.cached_only and not (folder / "adapter").is_dir():
        return None
    run_cli(folder, items)
    records = read_metrics(folder)
    final = max(r["round"] for r in records if r.get("split") == "global_test")
    loss = next(r["loss"] for r in records if r.get("split") == "global_test" and r["round"] == final)
    asr = [r["attack_success_rate"] for r in records if r.get("split") == "backdoor_test" and r["round"] == final]
    target = [r["target_loss"] for r in records if r.get("split") == "backdoor_test" and r["round"] == final]
    refusal = [r["refusal_rate"] for r in records if r.get("split") == "safety_test" and r["round"] == final]
    rounds = [r for r in records if r.get("split") == "aggregate"]
    outcome = [r.get("attack", {}) for r in rounds]
    return {
        "defence": defence,
        "attack": attack or "none",
        "malicious": count if attack else 0,
        "loss": loss,
        "asr": asr[0] if asr else None,
        "target_loss": target[0] if target else None,
        "refusal_rate": refusal[0] if refusal else None,
        "round_time_s": statistics.mean(r["train_time_s"] for r in rounds),
        "aggregate_time_s": statistics.mean(r["aggregation"].get("aggregate_time_s", float("nan")) for r in rounds),
        "attackers_excluded": sum(len(o.get("excluded_malicious", [])) for o in outcome),
        "honest_excluded": sum(len(o.get("excluded_honest", [])) for o in outcome),
        "attacker_rounds": count * len(rounds) if attack else 0,
    }


def _cell_text(r: dict[str, Any], clean_fedavg: float | None) -> str:
    text = f"{r['loss']:.3f}"
    if r["asr"] is not None:
        text += f" / ASR {r['asr']:.2f}"
    if r.get("target_loss") is not None:
        text += f" (target NLL {r['target_loss']:.2f})"
    if r["refusal_rate"] is not None:
        text += f" / refusal {r['refusal_rate']:.2f}"
    if r["attacker_rounds"]:
        text += f" ({r['attackers_excluded']}/{r['attacker_rounds']} caught, {r['honest_excluded']} honest out)"
    if clean_fedavg and r["loss"] <= 1.1 * clean_fedavg and (r["asr"] is None or r["asr"] < 0.1):
        text += " ok"
    return text


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, max_norm: float, clean_target: float | None = None) -> str:
    by = {(r["defence"], r["attack"], r["malicious"]): r for r in results}
    defences = [d for d in DEFENCES if any(key[0] == d for key in by)]
    clean_fedavg = by.get(("fedavg", "none", 0), {}).get("loss")
    lines = [
        f"Model `{args.model}`, WordNet domains (8 clients, all every round), {args.rounds} rounds x {args.local_steps} "
        f"local steps x batch {args.batch_size}, seed 0; final global-test loss on {args.eval_examples} examples (lower "
        f"is better), backdoor attack success rate (ASR) on triggered test prompts and the mean loss of the attacker's "
        f"target answer on them (target NLL: lower means the backdoor is further along), safety refusal rate on 60 held-out "
        f"harmful prompts, and how many attacker-rounds the defence excluded. norm_bound threshold {max_norm:.4g} "
        "(median clean update norm).",
        "",
        "| attack | malicious | " + " | ".join(defences) + " |",
        "|---|---|" + "---|" * len(defences),
    ]
    for attack in ["none", *ATTACKS]:
        for count in [0] if attack == "none" else [1, 2]:
            if not any((d, attack, count) in by for d in defences):
                continue
            cells = [_cell_text(by[(d, attack, count)], clean_fedavg) if (d, attack, count) in by else "-" for d in defences]
            lines.append(f"| {attack} | {count}/8 | " + " | ".join(cells) + " |")
    base = by.get(("fedavg", "none", 0))
    costs = [d for d in defences if (d, "none", 0) in by]
    if base:
        lines += [
            "",
            "Cost of each defence without attack: server aggregation time per round (wall round time incl. "
            "local training, relative to FedAvg): "
            + ", ".join(
                f"{d} {by[(d, 'none', 0)]['aggregate_time_s'] * 1000:.0f} ms ({by[(d, 'none', 0)]['round_time_s'] / base['round_time_s']:.2f}x)"
                for d in costs
            ),
        ]
    lines += ["", "`ok`: clean loss within 10% of FedAvg without attack and (backdoor) ASR under 10%."]
    if clean_target is not None:
        lines += [f"Backdoor target NLL of the clean FedAvg model (no attack): {clean_target:.2f}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, help="default 2 (study: 3)")
    parser.add_argument("--local-steps", type=int, help="default 2 (study: 2; its attackers: 10)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--only-attacks", nargs="*")
    parser.add_argument("--only-defences", nargs="*")
    parser.add_argument("--out", type=Path, help="default results/robustness (study: results/robustness-backdoor)")
    parser.add_argument("--backdoor-study", action="store_true", help="the backdoor alone, 2 of 8, a larger budget")
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--cached-only", action="store_true", help="report the finished cells, run none")
    args = parser.parse_args()
    study = args.backdoor_study
    if study and args.only_attacks:
        parser.error("--backdoor-study runs the backdoor only; drop --only-attacks")
    args.rounds = args.rounds or (3 if study else 2)
    args.local_steps = args.local_steps or 2
    args.out = args.out or HERE / "results" / ("robustness-backdoor" if study else "robustness")
    max_norm = calibrate_norm_bound(args)
    results = []
    defences = args.only_defences or list(DEFENCES)
    if study:  # the undefended reference and the undefended attack first: they say whether the study's budget suffices
        defences = ["fedavg", *(d for d in defences if d != "fedavg")]
        results.append(cell(args, "fedavg", None, 0, max_norm))
        results += [cell(args, defence, "backdoor", 2, max_norm) for defence in defences]
    else:
        for defence in defences:  # no attack first (the reference), then 2 of 8 (the harder case), then 1 of 8
            results.append(cell(args, defence, None, 0, max_norm))
        for count in (2, 1):
            for defence in defences:
                for attack in args.only_attacks or FULL_MATRIX:
                    results.append(cell(args, defence, attack, count, max_norm))
    results = [r for r in results if r is not None]
    known = {(r["defence"], r["attack"], r["malicious"]) for r in results}
    for folder in sorted(args.out.glob("*-*-*")):  # cells of earlier invocations (other --only-* choices)
        defence, rest = folder.name.split("-", 1)
        attack, count = rest.rsplit("-", 1)
        if (folder / "adapter").is_dir() and defence in DEFENCES and (defence, attack, int(count)) not in known:
            results.append(cell(args, defence, None if attack == "none" else attack, int(count), max_norm))
    results = [r for r in results if r is not None]
    markers = (
        (STUDY_START, STUDY_END, "Robustness: a backdoor that takes hold (`benchmarks/robustness.py --backdoor-study`)")
        if study
        else (START, END, "Robustness (`benchmarks/robustness.py`)")
    )
    publish(args.out, results, markdown(results, args, max_norm, clean_target_loss(args)), args.write_results, *markers)


if __name__ == "__main__":
    main()
