"""What the benchmarks share: running ``fedlm run`` with overrides, reading a run's metrics, writing RESULTS.md."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "examples" / "quickstart.yaml"


def run_cli(folder: Path, overrides: dict[str, Any], config: Path = QUICKSTART) -> float:
    """``fedlm run config --set k=v ... output_dir=folder`` unless ``folder`` already holds a finished run; seconds."""
    if (folder / "adapter").is_dir():
        return 0.0
    cmd = [sys.executable, "-m", "fedlm.cli", "run", str(config), "--overwrite", "--set", f"output_dir={folder}"]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    print(f"{folder.name}: {elapsed:.0f}s", flush=True)
    return elapsed


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The records of ``folder/metrics.jsonl``."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


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
