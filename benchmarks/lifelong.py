"""The lifelong-federation benchmark (issue 18, part 4): its three parts, one after the other, each writing its own
block of RESULTS.md.

- ``lifelong_continual.py``: the accuracy matrix (three WordNet domains arriving in turn) without a mitigation, with
  rehearsal, with EWC on the adapter, with both, and with every slice kept (the upper bound).
- ``lifelong_contribution.py``: LOO vs GTG-Shapley vs exact Shapley under a free-rider, a noisy and a duplicated
  client (rank correlation with exact, error, cost in coalitions and server forward passes).
- ``lifelong_watermark.py``: the watermark's cost in clean test loss, and verification and leak tracing of stolen
  copies as stolen, after 50 and 200 steps of fine-tuning, after pruning 20% and after ``export --merge``.

``python benchmarks/lifelong.py [--parts continual,contribution,watermark] [--model NAME] [--out DIR]
[--write-results]``. Each part runs in its own process (one heavy job at a time on a small machine); the continual
and watermark parts are resumable (a finished run is not run again). Smoke tests of each part are in their own
docstrings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from common import HERE

PARTS = {
    "continual": "lifelong_continual.py",
    "contribution": "lifelong_contribution.py",
    "watermark": "lifelong_watermark.py",
}


def command(part: str, args: argparse.Namespace) -> list[str]:
    """The command line that runs ``part`` with the shared options."""
    cmd = [sys.executable, str(HERE / PARTS[part]), "--model", args.model, "--out", str(args.out / part)]
    return cmd + (["--write-results"] if args.write_results else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"any of {', '.join(PARTS)}, comma-separated")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lifelong")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))}
    for part in parts:
        print(f"== {part}: {' '.join(command(part, args))}", flush=True)
        subprocess.run(command(part, args), check=True, env=env)


if __name__ == "__main__":
    main()
