"""The run directory: created fresh, or reused only with ``--resume`` / ``--overwrite``."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from fedlm.core.errors import FedlmError


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run's output folder."""

    root: Path
    replace: bool = False

    def create(self) -> None:
        """Make the folder (first removing the old run if it was checked to be replaced with --overwrite)."""
        if self.replace and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def log(self) -> Path:
        return self.root / "run.log"


#: What a folder holds once a run (or a comparison) has really started: its resolved config, metrics or results.
_RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "comparison.json", "federated/config.yaml")


def _occupied(root: Path) -> str:
    """Why a non-empty folder is refused: a run is there, or only leftovers (e.g. the log of a killed compare)."""
    if any((root / marker).exists() for marker in _RUN_MARKERS):
        return f"output_dir {str(root)!r} already holds a run; pass --resume to continue it, --overwrite to replace it, or set another `output_dir`"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (
        f"output_dir {str(root)!r} is not empty: it holds {shown} but no run (no config.yaml or metrics; e.g. the log of "
        "an interrupted start); pass --overwrite to replace it, or set another `output_dir`"
    )


def prepare_run_dir(path: str | Path, *, resume: bool, overwrite: bool) -> RunDir:
    """Check the run folder can be used; nothing is created or deleted until :meth:`RunDir.create`.

    An existing non-empty folder is refused unless ``resume`` (continue it) or ``overwrite`` (replace it).

    Raises:
        FedlmError: the folder exists (without --resume/--overwrite), or --resume finds nothing to resume.
    """
    if resume and overwrite:
        raise FedlmError("--resume and --overwrite exclude each other; choose one")
    root = Path(path)
    exists = root.exists() and any(root.iterdir())
    if resume:
        if not exists:
            raise FedlmError(f"--resume: {str(root)!r} holds no run to resume; drop --resume to start a new run")
        return RunDir(root)
    if exists:
        if not overwrite:
            raise FedlmError(_occupied(root))
        return RunDir(root, replace=True)
    return RunDir(root)
