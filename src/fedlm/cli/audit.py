"""``fedlm audit RUN_DIR``: rebuild a finished run's session and audit its last checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlm.config.io import load_config
from fedlm.core.errors import FedlmError
from fedlm.experiment import build_session, write_run_report
from fedlm.federation.checkpoint import list_checkpoints, load_checkpoint
from fedlm.privacy.audit_session import audit_session
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import RunDir


def audit_run(run_dir: Path, client: str | None, max_examples: int | None, console: RunConsole) -> dict[str, Any]:
    """Audit the run's last checkpoint; write ``audit.json`` (and ``report.md`` again, now with the audit).
    ``max_examples`` None: ``eval.audit.max_examples`` of the run, or 200."""
    folder = RunDir(Path(run_dir))
    checkpoints = list_checkpoints(folder.checkpoints)
    if not folder.config.is_file() or not checkpoints:
        raise FedlmError(f"{run_dir} holds no finished fedlm run (config.yaml and checkpoints/ are needed)")
    config = load_config(folder.config)
    if max_examples is None:
        max_examples = config.eval.audit.max_examples if config.eval.audit else 200
    session = build_session(config, console)
    ckpt = load_checkpoint(checkpoints[-1])
    report = audit_session(session, folder, ckpt.global_state, ckpt.round, client, max_examples, console)
    if (folder.root / "report.md").is_file():
        write_run_report(session, folder)
    return report
