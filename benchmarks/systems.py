"""Systems-heterogeneity benchmark: global-test loss against simulated time with 8 clients of which 2 are 5x slower.

On the quickstart setting (SmolLM2-135M-Instruct, LoRA r=8, the embedded WordNet definitions split one domain per
client: 8 clients), with ``systems`` device profiles: every client takes ``steps_per_s`` = 1 optimizer step per
simulated second except 2 clients (drawn with the seed) that take 0.2, and 100 Mbit/s both ways. Arms:

- ``sync``: synchronous FedAvg, every client every round; a round lasts as long as the slow clients;
- ``deadline-drop`` / ``deadline-partial``: ``federation.round_deadline_s`` = twice a fast client's compute time
  plus 2 s for the transfers; the slow clients are dropped, or send the steps that fit (2 of 5) with FedNova's
  normalisation;
- ``fedbuff``: FedBuff (buffer 4, all 8 clients in flight, staleness weight 1/sqrt(1+staleness)).

The deadline arms run as many rounds as fit in the synchronous run's simulated time; FedBuff runs the server steps
expected in ``--fedbuff-budget`` of it (0.8 by default: enough to see whether it reaches the goal at 0.6). Reported:
each arm's final loss, its simulated and wall seconds, and the simulated time at which it first reaches the
synchronous run's final loss (goal: FedBuff within 0.6x of the synchronous time). Constant learning rate in every
arm (a schedule over rounds would differ between arms with different round counts).

Smoke: ``python benchmarks/systems.py --model tiny-random-llama``. ``--write-results`` puts the table into
``benchmarks/RESULTS.md`` and the plot into ``benchmarks/systems.png``.
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path
from typing import Any

import torch
from common import HERE, publish, read_metrics, run_cli

START, END = "<!-- systems:start -->", "<!-- systems:end -->"
ARMS = ["sync", "deadline-drop", "deadline-partial", "fedbuff"]
CLIENTS, SLOW, SLOW_FACTOR, SPEED, MBPS, BUFFER = 8, 2, 5.0, 1.0, 100.0, 4
TRANSFER_MARGIN_S = 2.0  # the deadline's room for the adapter's download and upload (about 1.1 s for SmolLM2's r=8 LoRA at 100 Mbit/s)


def overrides(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    """Settings on top of the quickstart config for ``arm``."""
    fast_s = args.local_steps / SPEED
    sync_s = args.rounds * args.local_steps * SLOW_FACTOR / SPEED  # compute only: transfers add a little
    items: dict[str, Any] = {
        "model.name": args.model,
        "federation.clients_per_round": "null",
        "federation.local_steps": args.local_steps,
        "federation.lr_schedule": "constant",
        "eval.generate": False,
        "eval.max_examples": args.eval_examples,
        "eval.at_start": True,
        "systems.steps_per_s": SPEED,
        "systems.slow_clients": SLOW,
        "systems.slow_factor": SLOW_FACTOR,
        "systems.uplink_mbps": MBPS,
        "systems.downlink_mbps": MBPS,
    }
    rounds, every = args.rounds, 1
    if arm.startswith("deadline"):
        deadline = 2 * fast_s + TRANSFER_MARGIN_S
        rounds, every = math.floor(sync_s / deadline), 2
        items |= {"federation.round_deadline_s": deadline, "systems.late_clients": arm.removeprefix("deadline-")}
    if arm == "fedbuff":
        arrivals = sync_s * ((CLIENTS - SLOW) * SPEED + SLOW * SPEED / SLOW_FACTOR) / args.local_steps  # per simulated second x time
        rounds, every = math.ceil(args.fedbuff_budget * arrivals / BUFFER), 2
        items |= {"systems.mode": "fedbuff", "systems.fedbuff.buffer_size": BUFFER}
    items |= {"federation.rounds": rounds, "federation.checkpoint_every": rounds, "eval.every": every}
    if args.model == "tiny-random-llama":
        items["data.max_length"] = 256  # its byte tokenizer needs longer sequences
    return items


def summarise(folder: Path, arm: str) -> dict[str, Any]:
    """The loss curve against simulated seconds, and the run's simulated and wall seconds."""
    records = read_metrics(folder)
    sim = {0: 0.0} | {r["round"]: r["sim_seconds"] for r in records if r.get("split") == "aggregate"}
    wall = max((r["wall_seconds"] for r in records if r.get("split") == "aggregate"), default=0.0)
    curve = sorted((sim[r["round"]], r["loss"]) for r in records if r.get("split") == "global_test" and r["round"] in sim)
    dropped = sum(len(r["rejected"]) for r in records if r.get("split") == "aggregate")
    return {"arm": arm, "curve": curve, "loss": curve[-1][1], "sim_seconds": max(sim.values()), "wall_seconds": wall, "left_out": dropped}


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first simulated second at which the loss is at or below ``target`` (None: never)."""
    return next((t for t, loss in curve if loss <= target), None)


def results_markdown(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    sync = next((r for r in runs if r["arm"] == "sync"), None)
    target = sync["loss"] if sync else None
    lines = [
        f"Model `{args.model}`, `model.dtype: auto` (float32 on this CPU: {platform.processor() or platform.machine()}, no AVX512-BF16, "
        f"{torch.get_num_threads()} threads), quickstart data (8 clients, one WordNet domain each), LoRA r=8, {args.local_steps} local "
        f"steps x batch 8, lr 0.002 constant, seed 0. Devices: 1 step/s, 2 clients 0.2 step/s, {MBPS:g} Mbit/s. Loss: global test, "
        f"{args.eval_examples} examples. Regenerate: `python benchmarks/systems.py --write-results`.",
        "",
        "| arm | rounds / server steps | final loss | simulated s | wall s | clients left out | reaches sync's final loss at (simulated s) | x sync time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        reached = time_to(r["curve"], target) if target is not None else None
        ratio = f"{reached / sync['sim_seconds']:.2f}" if reached is not None and sync else "-"
        lines.append(
            f"| {r['arm']} | {r['rounds']} | {r['loss']:.4f} | {r['sim_seconds']:.0f} | {r['wall_seconds']:.0f} | {r['left_out']} | "
            f"{'-' if reached is None else f'{reached:.0f}'} | {ratio} |"
        )
    buff = next((r for r in runs if r["arm"] == "fedbuff"), None)
    if buff and sync:
        reached = time_to(buff["curve"], sync["loss"])
        met = reached is not None and reached <= 0.6 * sync["sim_seconds"]
        lines += ["", f"Goal (FedBuff reaches synchronous FedAvg's final loss in <= 0.6x its simulated time): {'met' if met else 'not met'}."]
    lines += ["", "![global-test loss against simulated seconds](systems.png)"]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        times, losses = zip(*r["curve"], strict=True)
        ax.plot(times, losses, marker="o", label=r["arm"])
    ax.set(xlabel="simulated seconds", ylabel="global-test loss", title="8 clients, 2 of them 5x slower")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=4, help="synchronous rounds (the other arms follow its simulated time)")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--fedbuff-budget", type=float, default=0.8, help="FedBuff's server steps: this share of the synchronous time")
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--arms", nargs="*", default=ARMS, choices=ARMS)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "systems")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    runs = []
    for arm in args.arms:
        folder = args.out / arm
        settings = overrides(args, arm)
        run_cli(folder, settings)
        runs.append({**summarise(folder, arm), "rounds": settings["federation.rounds"]})
    markdown = results_markdown(runs, args)
    publish(args.out, runs, markdown, args.write_results, START, END, "Systems heterogeneity (`benchmarks/systems.py`)")
    if args.write_results:
        plot(runs, HERE / "systems.png")


if __name__ == "__main__":
    main()
