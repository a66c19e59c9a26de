"""``fedlm contribution RUN_DIR``: the clients' contribution scores of a run (``contribution.methods``), as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedlm.cli.guard import guarded
from fedlm.core.errors import FedlmError

DebugOpt = Annotated[bool, typer.Option("--debug", help="show full tracebacks")]


def contribution(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (written by `fedlm run` with `contribution.methods`)")],
    debug: DebugOpt = False,
) -> None:
    """Print each client's cumulative contribution score and rank by every method, and the methods' cost."""

    def action() -> None:
        from fedlm.reporting.contribution import contribution_rows, cost_rows, scored_rounds
        from fedlm.reporting.metrics_log import MetricsLog
        from fedlm.reporting.tables import markdown_table

        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            raise FedlmError(f"{metrics} is missing, so {run_dir} holds no fedlm run")
        records = MetricsLog(metrics).read()
        rows, methods = contribution_rows(records)
        if not rows:
            raise FedlmError(f"{run_dir} has no contribution scores: run it with `contribution.methods` (e.g. [gtg]) and `contribution.validation`")
        rounds = scored_rounds(records)
        typer.echo(f"contribution after {len(rounds)} scored rounds (primary: {methods[0]})")
        typer.echo(markdown_table(rows, ["client", *(c for m in methods for c in (m, f"{m} rank")), "rounds scored"]))
        typer.echo("")
        typer.echo(markdown_table(cost_rows(records, methods), ["method", "coalitions / round", "forward passes / round"]))

    guarded(debug, action)


def register(app: typer.Typer) -> None:
    """Add ``fedlm contribution`` to ``app``."""
    app.command("contribution")(contribution)
