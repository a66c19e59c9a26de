"""Running a CLI action: a FedlmError becomes one red line and exit code 2, Ctrl-C a hint to resume."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from fedlm.core.errors import FedlmError


def guarded(debug: bool, action: Callable[[], Any]) -> Any:
    """Run ``action``; a FedlmError (or a broken input found deeper) becomes one line and exit code 2."""
    try:
        return action()
    except FedlmError as exc:
        if debug:
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.secho("interrupted; continue with --resume", err=True)
        raise typer.Exit(130) from None
