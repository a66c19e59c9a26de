"""Memory in the number of clients: 10, 100 and 1,000 simulated clients, 10 per round, on the tiny model, with the
two kinds of per-client state the simulation keeps (SCAFFOLD's control variates c_i and top-k error-feedback
residuals). Goal: peak RSS flat in the number of clients, because only the round's clients' state is in memory and
the rest is on disk under ``RUN_DIR/clients/<name>/`` (:mod:`fedlm.core.client_state`).

Two arms per client count, each a fresh subprocess (peak RSS = the child's ``ru_maxrss``): ``disk`` (fedlm as it is)
and ``memory`` (the same run with the spill switched off, every client's state kept in the aggregator, as before).
The data is fixed (all 4,000 embedded WordNet definitions, split iid: every client needs an example that fits
``data.max_length``), so only the number of clients changes. The
adapter is LoRA rank 64 on every linear layer of the tiny model (~0.5 MiB per state) so that per-client state is
large enough to see. Checkpoints only after the last round (a checkpoint of the memory arm holds every state).

Run ``python benchmarks/systems_scale.py [--rounds 50] [--write-results]`` (tiny model only: a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import publish  # noqa: E402

CLIENTS = (10, 100, 1000)
PER_ROUND = 10
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
START, END = "<!-- systems-scale:start -->", "<!-- systems-scale:end -->"
MIB = 2**20


def config_of(clients: int, rounds: int, output_dir: Path) -> dict[str, Any]:
    """The run of one arm: tiny model, all embedded WordNet definitions split iid, SCAFFOLD with top-k uplink."""
    return {
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"name": "tiny-random-llama"},
        "peft": {"method": "lora", "r": 64, "alpha": 64, "dropout": 0.0, "target_modules": TARGETS},
        "data": {"train": "embedded:wordnet_defs", "max_length": 64},
        "partition": {"method": "iid", "num_clients": clients},
        "federation": {"rounds": rounds, "clients_per_round": PER_ROUND, "local_steps": 1, "batch_size": 2, "lr": 1e-3, "checkpoint_every": rounds},
        "aggregation": {"name": "scaffold"},
        "compression": {"uplink": {"method": "topk", "ratio": 0.1}},
        "eval": {"max_examples": 8, "at_start": False, "every": 0, "generate": False},
    }


def child(args: argparse.Namespace) -> None:
    """One arm in this process; prints one JSON line."""
    from fedlm import experiment  # noqa: PLC0415 - after the arm's switch is known
    from fedlm.config.io import validate_config  # noqa: PLC0415
    from fedlm.loop_build import client_side  # noqa: PLC0415
    from fedlm.reporting.progress import RunConsole  # noqa: PLC0415
    from fedlm.reporting.run_dir import RunDir  # noqa: PLC0415

    torch.set_num_threads(1)
    if args.arm == "memory":
        client_side.spill_client_states = lambda *a, **k: None  # type: ignore[assignment]  # the state stays in the aggregator
    out = Path(args.out)
    config = validate_config(config_of(args.clients, args.rounds, out))
    console = RunConsole(quiet=True)
    session = experiment.build_session(config, console)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_dir = RunDir(out, replace=True)
    run_dir.create()
    started = time.perf_counter()
    experiment.run_federated(session, run_dir, resume=False, console=console)
    elapsed = time.perf_counter() - started
    records = [json.loads(line) for line in run_dir.metrics.read_text().splitlines()]
    trained = {r["client"] for r in records if r.get("split") == "train"}
    on_disk = sum(p.stat().st_size for p in (out / "clients").rglob("*.safetensors")) if (out / "clients").is_dir() else 0
    checkpoint = sorted((out / "checkpoints").glob("round_*"))[-1] / "aggregator_state.pt"
    if (args.arm == "memory") != (on_disk == 0):  # the switch must have taken: a moved function would leave it a no-op
        raise SystemExit(f"arm {args.arm!r} has {on_disk} bytes of client state on disk: the spill switch did not take")
    adapter = sum(t.numel() * t.element_size() for t in session.initial_state.values())
    print(
        json.dumps(
            {
                "arm": args.arm,
                "clients": args.clients,
                "rounds": args.rounds,
                "clients_trained": len(trained),
                "adapter_mib": adapter / MIB,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_before_run_mib": before / 1024,
                "state_on_disk_mib": on_disk / MIB,
                "checkpoint_state_mib": checkpoint.stat().st_size / MIB,
                "run_s": elapsed,
            }
        )
    )


def run_arm(arm: str, clients: int, rounds: int, root: Path) -> dict[str, Any]:
    """One arm in a fresh subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--arm",
        arm,
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--out",
        str(root / f"{arm}-{clients}"),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{arm} {clients}: peak RSS {row['peak_rss_mib']:.0f} MiB, {row['run_s']:.0f}s: {json.dumps(row)}", flush=True)
    return row


def table(rows: list[dict[str, Any]], rounds: int) -> str:
    """The markdown of RESULTS.md."""
    first = rows[0]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} (1 thread); tiny-random-llama, "
        f"float32 on cpu; LoRA r=64 on all linear layers ({first['adapter_mib']:.2f} MiB adapter); SCAFFOLD (option I) with top-k 10% uplink "
        f"and error feedback (two per-client states: c_i and the residual); {PER_ROUND} clients per round, {rounds} rounds, 1 local step of batch 2; "
        "all 4,000 training examples split iid whatever the number of clients.",
        "",
        "| clients | arm | clients trained | peak RSS (MiB) | RSS before the run (MiB) | growth in the run (MiB) | state on disk (MiB) | state in the checkpoint (MiB) | run (s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['arm']} | {r['clients_trained']} | {r['peak_rss_mib']:.0f} | {r['rss_before_run_mib']:.0f} | "
            f"{r['peak_rss_mib'] - r['rss_before_run_mib']:.0f} | {r['state_on_disk_mib']:.1f} | {r['checkpoint_state_mib']:.1f} | {r['run_s']:.0f} |"
        )
    disk = [r for r in rows if r["arm"] == "disk"]
    if not disk:
        return "\n".join(lines)
    spread = max(r["peak_rss_mib"] for r in disk) - min(r["peak_rss_mib"] for r in disk)
    lines += ["", f"- `disk` arm (fedlm): peak RSS spread over {', '.join(str(r['clients']) for r in disk)} clients = {spread:.0f} MiB."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--clients", type=int, nargs="*", default=list(CLIENTS))
    parser.add_argument("--arms", nargs="*", default=["disk", "memory"])
    parser.add_argument("--memory-at", type=int, nargs="*", default=None, help="client counts that also run the memory arm (default: all)")
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.clients = args.clients[0]
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="fedlm-scale-") as tmp:
        memory_at = set(args.clients if args.memory_at is None else args.memory_at)
        arms = [(arm, n) for n in args.clients for arm in args.arms if arm != "memory" or n in memory_at]
        rows = [run_arm(arm, n, args.rounds, Path(tmp)) for arm, n in arms]
    heading = "Memory in the number of clients (`benchmarks/systems_scale.py`)"
    publish(HERE.parent / "runs" / "systems_scale", rows, table(rows, args.rounds), args.write_results, START, END, heading)


if __name__ == "__main__":
    main()
