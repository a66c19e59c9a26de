"""Flower's Simulation Engine (Ray) against the in-process simulation: the same federation (config, seed, clients,
steps), ``fedlm run`` with ``federation.runtime: flower-simulation`` (``--workers`` Ray workers of one core each,
clients in parallel) and with ``runtime: simulation`` (the clients one after the other, on all ``--workers`` cores).

Reported: the wall time of each ``fedlm run`` (process start to exit: imports, Ray's start, model loads, rounds,
evaluation, report), the server's ``train_time_s`` per round (sending the tasks to holding every update; round 1 on
the engine includes the workers' imports and base-model loads), the base-model loads per worker, and the largest
difference between the two final adapters. Run ``python benchmarks/simulation_engine.py [--model tiny-random-llama|
smollm2-135m-instruct] [--clients 8] [--rounds 2] [--workers 2] [--write-results]``; each model's numbers are kept in
``--out`` and the table shows every model measured.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import publish, read_metrics, runtime_comparison_config  # noqa: E402

START, END = "<!-- simulation-engine:start -->", "<!-- simulation-engine:end -->"


def build_config(args: argparse.Namespace, output_dir: Path, runtime: str) -> dict[str, Any]:
    """The benchmark's config in ``runtime`` (:func:`common.runtime_comparison_config`)."""
    return runtime_comparison_config(
        args.model, args.clients, args.rounds, args.steps, output_dir, runtime, simulation_engine={"num_cpus": 1, "ray_cpus": args.workers}
    )


def run(args: argparse.Namespace, work: Path, runtime: str, threads: int) -> tuple[Path, float]:
    """``fedlm run`` of the config on ``runtime`` with ``threads`` torch threads in the process; (run dir, seconds)."""
    out, cfg = work / runtime, work / f"{runtime}.yaml"
    cfg.write_text(yaml.safe_dump(build_config(args, out, runtime)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "RAY_TMPDIR": str(work)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fedlm.cli", "run", str(cfg)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"`fedlm run` on {runtime} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return out, time.perf_counter() - started


def summarize(sim: Path, engine: Path, sim_s: float, engine_s: float, args: argparse.Namespace) -> dict[str, Any]:
    def rounds(folder: Path) -> list[float]:
        return [r["train_time_s"] for r in read_metrics(folder) if r["split"] == "aggregate"]

    trains = [r for r in read_metrics(engine) if r["split"] == "train"]
    a, b = load_file(str(sim / "adapter" / "adapter_model.safetensors")), load_file(str(engine / "adapter" / "adapter_model.safetensors"))
    loads = [r["model_load_s"] for r in trains if r["model_load_s"] > 0]
    return {
        "model": args.model,
        "clients": args.clients,
        "rounds": args.rounds,
        "local_steps": args.steps,
        "workers": args.workers,
        "simulation_round_s": rounds(sim),
        "engine_round_s": rounds(engine),
        "model_loads": len(loads),
        "model_load_s": statistics.mean(loads) if loads else 0.0,
        "local_train_s_per_client": statistics.mean(r["local_train_s"] for r in trains),
        "simulation_total_s": sim_s,
        "engine_total_s": engine_s,
        "adapter_max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
    }


def markdown(summaries: list[dict[str, Any]]) -> str:
    """One table over every model measured (each model's summary is kept in ``--out``)."""

    def fmt(xs: list[float]) -> str:
        return ", ".join(f"{x:.1f}" for x in xs)

    lines = [
        "`fedlm run` of the same config and seed on `federation.runtime: flower-simulation` (Flower's Simulation Engine, "
        "Ray backend, one-core workers training clients in parallel) and on `runtime: simulation` (in-process, the clients "
        "one after the other with as many torch threads as workers), float32, this 2-core AMD EPYC (AVX2, no AVX512-BF16); "
        "evaluation only after the last round. Whole run: process start to exit. Round 1 on the engine includes the "
        "workers' first base-model load; their imports happen at the handshake, which the server does before round 1 "
        "(its `connected` record); rows measured before 2026-12-02 count the imports in round 1 too.",
        "",
        "| model | clients x rounds x local steps | workers | whole run sim / engine (s) | simulation s/round | engine s/round | "
        "base-model loads on the engine (s each) | local training s/client on the engine | adapter max diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        lines.append(
            f"| {s['model']} | {s['clients']} x {s['rounds']} x {s['local_steps']} | {s['workers']} | "
            f"{s['simulation_total_s']:.0f} / {s['engine_total_s']:.0f} | {fmt(s['simulation_round_s'])} | {fmt(s['engine_round_s'])} | "
            f"{s['model_loads']} ({s['model_load_s']:.1f}) | {s['local_train_s_per_client']:.1f} | {s['adapter_max_abs_diff']:.2g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-random-llama")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    p.add_argument("--workers", type=int, default=2, help="Ray workers of one core each (`simulation_engine.ray_cpus`)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "simulation_engine")
    p.add_argument("--write-results", action="store_true", help="put the table in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedlm-bench-", dir="/tmp") as tmp:
        work = Path(tmp)
        sim, sim_s = run(args, work, "simulation", args.workers)
        engine, engine_s = run(args, work, "flower-simulation", 1)
        summary = summarize(sim, engine, sim_s, engine_s, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.model}-{args.workers}.json").write_text(json.dumps(summary, indent=1))
    summaries = [json.loads(f.read_text()) for f in sorted(args.out.glob("*.json")) if f.name != "summary.json"]
    summaries.sort(key=lambda x: x["model"] != "tiny-random-llama")
    publish(
        args.out,
        summaries,
        markdown(summaries),
        args.write_results,
        START,
        END,
        "Flower simulation engine (Ray) vs in-process (`benchmarks/simulation_engine.py`)",
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
