"""What the benchmarks share: running ``fedlm run`` with overrides, reading a run's metrics, writing RESULTS.md."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "examples" / "quickstart.yaml"
# The federation every benchmark built on the quickstart measured: 4 of the 8 clients per round for 4 rounds, evaluated
# every 2 (the quickstart's schedule until it moved to 2 clients x 8 rounds, issue 21); an arm's own settings override it.
BENCHMARK_SCHEDULE: dict[str, Any] = {"federation.clients_per_round": 4, "federation.rounds": 4, "eval.every": 2}


def cpu_name() -> str:
    """The CPU model and whether it has bfloat16 matrix instructions (then ``dtype: auto`` picks bfloat16)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch  # noqa: PLC0415 - only the benchmarks that print the machine need it

    from fedlm.models.dtype import cpu_has_fast_bf16  # noqa: PLC0415

    return f"{name} ({'with' if cpu_has_fast_bf16() else 'no'} AVX512-BF16/AMX, {torch.get_num_threads()} threads)"


def run_cli(folder: Path, overrides: dict[str, Any], config: Path = QUICKSTART) -> float:
    """``fedlm run config --set k=v ... output_dir=folder`` unless ``folder`` already holds a finished run; its wall
    seconds (kept in ``folder/wall_seconds.txt``, so a resumed benchmark reports them; 0 when unknown)."""
    seconds_file = folder / "wall_seconds.txt"
    if (folder / "adapter").is_dir():
        return float(seconds_file.read_text()) if seconds_file.exists() else 0.0
    cmd = [sys.executable, "-m", "fedlm.cli", "run", str(config), "--overwrite", "--set", f"output_dir={folder}"]
    for key, value in ({**BENCHMARK_SCHEDULE, **overrides} if config == QUICKSTART else overrides).items():
        cmd += ["--set", f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    seconds_file.write_text(f"{elapsed:.1f}\n")
    print(f"{folder.name}: {elapsed:.0f}s", flush=True)
    return elapsed


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The records of ``folder/metrics.jsonl``."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def arm_parser(description: str | None, out: Path, rounds: int, local_steps: int) -> argparse.ArgumentParser:
    """The options every arm benchmark takes: ``--model``, ``--rounds``, ``--local-steps``, ``--eval-examples``,
    ``--out`` and ``--write-results``; the caller adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--local-steps", type=int, default=local_steps)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--write-results", action="store_true")
    return parser


def add_only(parser: argparse.ArgumentParser, arms: Mapping[str, Any]) -> None:
    """``--only NAME ...``: a subset of ``arms`` (see :func:`chosen`)."""
    parser.add_argument("--only", nargs="*", default=None, help=f"a subset of {', '.join(arms)}")


def chosen(parser: argparse.ArgumentParser, only: list[str] | None, arms: Mapping[str, Any], noun: str) -> list[str]:
    """The arms ``--only`` names (all of ``arms`` without it); an unknown name is a usage error naming the choices."""
    names = only or list(arms)
    unknown = sorted(set(names) - set(arms))
    if unknown:
        parser.error(f"unknown {noun} {unknown}; choose from {', '.join(arms)}")
    return names


def run_arms(out: Path, arms: Mapping[str, dict[str, Any]], summarise: Callable[[Path, str, float], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each arm (name -> overrides) into ``out/<name>`` (spaces as dashes; a finished run is not run again) and
    summarise it from its folder, name and seconds (0 when it was already finished); the summaries in order."""
    rows = []
    for name, items in arms.items():
        folder = out / name.replace(" ", "-")
        rows.append(summarise(folder, name, run_cli(folder, items)))
    return rows


def write_results_block(start: str, end: str, heading: str, markdown: str) -> None:
    """Put ``markdown`` between the ``start``/``end`` markers of RESULTS.md (a new ``heading`` section if absent)."""
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{start}\n{markdown}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text += f"\n## {heading}\n\n{block}\n"
    path.write_text(text)


def publish(out: Path, summary: Any, markdown: str, write: bool, start: str, end: str, heading: str) -> None:
    """Save ``summary`` as ``out/summary.json``, print ``markdown`` and, with ``write``, put it in RESULTS.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(markdown)
    if write:
        write_results_block(start, end, heading, markdown)


def runtime_comparison_config(model: str, clients: int, rounds: int, steps: int, output_dir: Path, runtime: str, **federation: Any) -> dict[str, Any]:
    """The config the runtime benchmarks (``flower.py``, ``simulation_engine.py``) run in each runtime: embedded
    WordNet data split iid among ``clients`` clients, every client every round, evaluation only at the end;
    ``federation`` adds runtime settings (e.g. ``simulation_engine``)."""
    return {
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"name": model},
        "peft": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"max_train_examples": 80 * clients, "max_length": 128},
        "partition": {"method": "iid", "num_clients": clients, "field": None},
        "federation": {
            "runtime": runtime,
            "rounds": rounds,
            "clients_per_round": clients,
            "local_steps": steps,
            "batch_size": 4,
            "lr": 1e-3,
            **federation,
        },
        "eval": {"max_examples": 16, "max_new_tokens": 4, "batch_size": 8, "at_start": False, "every": 0},
    }
