"""Flower runtime overhead: the same federation (config, seed, clients, steps) in the in-process simulation and on
a local Flower deployment (one SuperLink and one SuperNode per client on 127.0.0.1, as subprocesses).

Reported per round: the server's ``train_time_s`` (sending the tasks to collecting the updates) in each runtime,
the overhead (Flower - simulation), and, per ClientApp message, the time before the handler runs
(``process_start_s``), the base-model load time (``model_load_s``) and the whole set-up before training
(``setup_s``: config, model, adapter, data); the final adapters are compared too. ``--clientapp long-lived`` (the
default, what ``fedlm flower supernode`` runs) serves every message of a node in one process that keeps the model;
``--clientapp per-message`` is Flower's default, a fresh ClientApp process per message (imports and set-up each time).
Run ``python benchmarks/flower.py [--model tiny-random-llama|smollm2-135m-instruct] [--clients 3] [--rounds 2]
[--clientapp long-lived|per-message] [--write-results]``; each model's and arm's numbers are kept in ``--out`` and the
table shows every one measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

from fedlm.runtime.flower.local import LocalFederation

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import publish, read_metrics, runtime_comparison_config  # noqa: E402

START, END = "<!-- flower:start -->", "<!-- flower:end -->"


def build_config(args: argparse.Namespace, output_dir: Path, runtime: str) -> dict[str, Any]:
    """The benchmark's config in ``runtime`` (:func:`common.runtime_comparison_config`)."""
    return runtime_comparison_config(args.model, args.clients, args.rounds, args.steps, output_dir, runtime)


def run_simulation(args: argparse.Namespace, work: Path) -> tuple[Path, float]:
    out = work / "simulation"
    cfg = work / "simulation.yaml"
    cfg.write_text(yaml.safe_dump(build_config(args, out, "simulation")))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedlm.cli", "run", str(cfg)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out, time.perf_counter() - started


def run_flower(args: argparse.Namespace, work: Path) -> tuple[Path, float]:
    out = work / "flower"
    cfg = work / "flower.yaml"
    cfg.write_text(yaml.safe_dump(build_config(args, out, "flower")))
    per_message = args.clientapp == "per-message"
    fed = LocalFederation(work / "fed", cfg, list(range(args.clients)), node_threads=args.node_threads, process_per_message=per_message)
    try:
        fed.start()
        started = time.perf_counter()
        code = fed.run("--round-timeout", "1800").wait(timeout=3600)
        elapsed = time.perf_counter() - started
    finally:
        fed.stop()
    if code != 0 or not (out / "adapter").is_dir():
        raise SystemExit(f"the Flower run failed (exit {code}); logs in {work / 'fed'}")
    return out, elapsed


def summarize(sim: Path, flower: Path, sim_s: float, flower_s: float, args: argparse.Namespace) -> dict[str, Any]:
    def rounds(folder: Path) -> list[float]:
        return [r["train_time_s"] for r in read_metrics(folder) if r["split"] == "aggregate"]

    trains = [r for r in read_metrics(flower) if r["split"] == "train"]
    connected = [r["seconds"] for r in read_metrics(flower) if r.get("event") == "connected"]
    a, b = load_file(str(sim / "adapter" / "adapter_model.safetensors")), load_file(str(flower / "adapter" / "adapter_model.safetensors"))
    return {
        "model": args.model,
        "clients": args.clients,
        "rounds": args.rounds,
        "local_steps": args.steps,
        "node_threads": args.node_threads,
        "clientapp": args.clientapp,
        "load_average": os.getloadavg()[0],
        "simulation_round_s": rounds(sim),
        "flower_round_s": rounds(flower),
        # waiting for the nodes and greeting them, before round 1 (since the runtime connects at the run's start)
        "connect_s": connected[0] if connected else None,
        "overhead_per_round_s": statistics.mean(rounds(flower)) - statistics.mean(rounds(sim)),
        "model_load_s_per_message": statistics.mean(r["model_load_s"] for r in trains),
        "setup_s_per_message": statistics.mean(r["setup_s"] for r in trains),
        "process_start_s_per_message": statistics.mean(r.get("process_start_s", float("nan")) for r in trains),
        "local_train_s_per_message": statistics.mean(r.get("local_train_s", float("nan")) for r in trains),
        "task_pull_s_per_message": statistics.mean(r.get("task_pull_s", float("nan")) for r in trains),
        # the server's wait beyond its slowest ClientApp: messaging through the SuperLink and Flower's polling
        "transport_s_per_round": statistics.mean(
            t - max(r.get("clientapp_s", float("nan")) for r in trains if r["round"] == i + 1) for i, t in enumerate(rounds(flower))
        ),
        "simulation_total_s": sim_s,
        "flower_total_s": flower_s,
        "adapter_max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
    }


def _connect(summary: dict[str, Any]) -> str:
    """The ClientApp cell's note on the run's start: the nodes greeted before round 1, and how long it took."""
    seconds = summary.get("connect_s")
    return "" if seconds is None else f", nodes greeted before round 1 in {seconds:.1f} s"


def markdown(summaries: list[dict[str, Any]]) -> str:
    """One table over every model measured (each model's summary is kept in ``--out``)."""

    def fmt(xs: list[float]) -> str:
        return ", ".join(f"{x:.1f}" for x in xs)

    lines = [
        "One SuperLink and one SuperNode per client, all on this 2-core machine (127.0.0.1), against the in-process "
        "simulation of the same config and seed; evaluation only after the last round. Train time per round is the "
        "server's, from sending the tasks to holding every update. ClientApp `long-lived`: fedlm's one process per "
        "SuperNode, which keeps the model between messages; `per-message`: Flower's fresh process per message. The "
        "simulation trains the clients one after the other on all cores; the SuperNodes train at once, sharing the cores "
        "(`--node-threads` each), as separate machines would not. Load: the machine's 1-minute load average at the end.",
        "",
        "| model | ClientApp | clients x rounds x local steps | simulation s/round | Flower s/round | overhead s/round | per message: process "
        "start + imports (per-message) or task pull (long-lived) / model load / set-up / local training (s) | transport + polling s/round | "
        "whole run sim / Flower (s) | adapter max diff | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        per_message = " / ".join(
            f"{s.get(k, float('nan')):.1f}"
            for k in ("process_start_s_per_message", "model_load_s_per_message", "setup_s_per_message", "local_train_s_per_message")
        )
        lines.append(
            f"| {s['model']} ({s.get('node_threads', '?')} thread/node) | {s.get('clientapp', 'per-message')}{_connect(s)} | {s['clients']} x {s['rounds']} x {s['local_steps']} | "
            f"{fmt(s['simulation_round_s'])} | {fmt(s['flower_round_s'])} | {s['overhead_per_round_s']:.1f} | {per_message} | "
            f"{s.get('transport_s_per_round', float('nan')):.1f} | {s['simulation_total_s']:.0f} / {s['flower_total_s']:.0f} | "
            f"{s['adapter_max_abs_diff']:.2g} | {s.get('load_average', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-random-llama")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    p.add_argument(
        "--node-threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) // 3),
        help="CPU threads per SuperNode's ClientApp (the nodes share this machine's cores)",
    )
    p.add_argument(
        "--clientapp",
        choices=["long-lived", "per-message"],
        default="long-lived",
        help="fedlm's long-lived ClientApp process per SuperNode, or Flower's fresh process per message",
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "flower")
    p.add_argument("--write-results", action="store_true", help="put the table in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fedlm-bench-flower-"))
    sim, sim_s = run_simulation(args, work)
    flower, flower_s = run_flower(args, work)
    summary = summarize(sim, flower, sim_s, flower_s, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.model}-{args.node_threads}-{args.clientapp}.json").write_text(json.dumps(summary, indent=1))
    summaries = [json.loads(f.read_text()) for f in sorted(args.out.glob("*.json")) if f.name != "summary.json"]
    summaries.sort(key=lambda x: (x["model"] != "tiny-random-llama", x["model"], x.get("clientapp", "per-message") != "per-message"))
    publish(args.out, summaries, markdown(summaries), args.write_results, START, END, "Flower runtime overhead")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
