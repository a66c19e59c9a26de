"""What the tests of fedlm over Flower share: a tiny config run by the ServerApp over an in-process grid of
ClientApps (Flower's messages, no processes), or by a real SuperLink and SuperNodes on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from conftest import tiny_config, write_config
from flower_grid import InMemoryGrid
from flwr.app import Context, RecordDict

from fedlm.runtime.flower import client_app, server_app
from fedlm.runtime.flower.local import LocalFederation


def flower_sections(sections: dict[str, Any]) -> dict[str, Any]:
    """``sections`` with ``federation.runtime: flower``."""
    return {**sections, "federation": {**sections.get("federation", {}), "runtime": "flower"}}


def run_on_grid(output_dir: Path, sections: dict[str, Any], grid_type: type[InMemoryGrid] = InMemoryGrid, **grid: Any) -> InMemoryGrid:
    """The tiny config of ``sections`` (3 nodes, partitions 0-2, Flower runtime) run by the ServerApp over an
    in-process grid; the grid (with every message it sent and received)."""
    text = yaml.safe_dump(tiny_config(output_dir, **flower_sections(sections)))
    nodes = grid_type(client_app.app, {n: {"partition-id": n - 1} for n in (1, 2, 3)}, {"fedlm-config": text}, **grid)
    server_app.main(nodes, Context(1, 0, {}, RecordDict(), {"fedlm-config": text, "round-timeout": 30.0, "wait-for-nodes": 1.0}))
    return nodes


def run_on_supernodes(workdir: Path, config: Path, run_dir: Path, partitions: tuple[int, ...] = (0, 1, 2)) -> None:
    """A SuperLink and SuperNodes for ``partitions`` run ``config`` to its end (its final adapter written); every
    process is stopped after. On failure the processes' logs are in the assertion message."""
    fed = LocalFederation(workdir, config, list(partitions))
    try:
        fed.start()
        code = fed.run("--round-timeout", "300").wait(timeout=900)
        finished = (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert code == 0 and finished, "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(fed.workdir.glob("*.log")))
    finally:
        fed.stop()


def write_flower_config(path: Path, run_dir: Path, sections: dict[str, Any]) -> Path:
    """The tiny config of ``sections`` on the Flower runtime, written to ``path``."""
    return write_config(path, tiny_config(run_dir, **flower_sections(sections)))
