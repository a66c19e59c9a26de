"""``fedlm watermark ...``: verify a model's ownership watermark, trace a leaked copy to the client it was sent to.

Registered in :mod:`fedlm.cli` with ``app.add_typer(watermark_app, name="watermark")``. A wrong key is no error: it
reports chance. A folder that holds no model, or an adapter that does not fit its base, prints one ``error:`` line
and exits with code 2 (``--debug`` shows the traceback), as every fedlm command does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedlm.cli.guard import guarded
from fedlm.core.errors import FedlmError

DebugOpt = Annotated[bool, typer.Option("--debug", help="show full tracebacks")]
ModelArg = Annotated[Path, typer.Argument(help="a run folder, a peft adapter folder, or a merged model folder (`fedlm export --merge`)")]
SecretOpt = Annotated[str, typer.Option("--secret", envvar="FEDLM_WATERMARK_SECRET", help="the watermark key (or env FEDLM_WATERMARK_SECRET)")]
BaseOpt = Annotated[str | None, typer.Option("--model", help="the base model of an adapter folder outside its run folder")]
SizeOpt = Annotated[int | None, typer.Option("--size", min=1, help="shared triggers to test (default: the run's `watermark.size`, else 64)")]
AlphaOpt = Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="significance: a watermark is reported below this p-value")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]

watermark_app = typer.Typer(no_args_is_help=True, help="Model ownership: verify a watermark, trace a leaked copy to its client.")


def _size(given: int | None, suspect_config: object | None, key: str, default: int) -> int:
    """``--size`` if given, else the run's ``watermark.<key>`` when the model lies in a watermarked run, else ``default``."""
    if given is not None:
        return given
    section = getattr(suspect_config, "watermark", None)
    return int(getattr(section, key)) if section is not None and section.enabled else default


@watermark_app.command("verify")
def verify(
    model: ModelArg,
    secret: SecretOpt,
    base: BaseOpt = None,
    size: SizeOpt = None,
    alpha: AlphaOpt = 1e-3,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Test MODEL on the key's trigger set: its trigger accuracy and the p-value against chance (1/K)."""

    def action() -> None:
        from fedlm.watermark.suspect import open_suspect  # noqa: PLC0415 - start-up speed: torch loads on use
        from fedlm.watermark.verify import verify_model  # noqa: PLC0415 - start-up speed

        suspect = open_suspect(model, base)
        result = verify_model(suspect.model, suspect.tokenizer, suspect.device, secret, _size(size, suspect.config, "size", 64))
        if json_out:
            typer.echo(json.dumps({**result.as_dict(), "present": result.present(alpha), "alpha": alpha}))
            return
        verdict = "present" if result.present(alpha) else "not found"
        typer.echo(f"watermark {verdict} in {model} ({suspect.kind}): {result.summary()}; threshold p < {alpha:g}")

    guarded(debug, action)


@watermark_app.command("trace")
def trace(
    model: ModelArg,
    secret: SecretOpt,
    run: Annotated[Path | None, typer.Option("--run", help="the run folder whose clients to test (default: the one MODEL lies in)")] = None,
    clients: Annotated[str | None, typer.Option("--clients", help="comma-separated client names to test (instead of the run's)")] = None,
    base: BaseOpt = None,
    size: SizeOpt = None,
    client_size: Annotated[int | None, typer.Option("--client-size", min=1, help="each client's triggers to test (default: the run's)")] = None,
    alpha: AlphaOpt = 1e-3,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Name the client whose marked copy MODEL is (each client's own trigger set, Bonferroni over the clients)."""

    def action() -> None:
        from fedlm.watermark.suspect import open_suspect  # noqa: PLC0415 - start-up speed: torch loads on use
        from fedlm.watermark.trace import has_registry, read_registry, trace_model  # noqa: PLC0415 - start-up speed

        suspect = open_suspect(model, base)
        run_root = run if run is not None else suspect.run_root
        registry = read_registry(run_root) if run_root is not None and (clients is None or has_registry(run_root)) else {}
        names = [c.strip() for c in clients.split(",") if c.strip()] if clients is not None else list(registry.get("clients", []))
        if not names:
            raise FedlmError(f"no clients to test: {model} lies in no run folder with a client registry; pass --run RUN_DIR or --clients a,b,...")
        n_shared = size if size is not None else int(registry.get("size", 64))
        n_client = client_size if client_size is not None else int(registry.get("client_size", 32))
        result = trace_model(suspect.model, suspect.tokenizer, suspect.device, secret, names, n_shared, n_client, alpha)
        if json_out:
            typer.echo(json.dumps(result.as_dict()))
            return
        typer.echo(f"shared watermark: {result.shared.summary()}")
        for name, v in result.clients.items():
            typer.echo(f"client {name}: {v.summary()}")
        leaked = result.leaked
        if leaked is None:
            typer.echo(f"no client's mark found (threshold p < {alpha:g} after Bonferroni over {len(names)} clients)")
        else:
            typer.echo(f"leaked copy of client {leaked} (p = {result.clients[leaked].p_value:.3g}, Bonferroni over {len(names)} clients)")

    guarded(debug, action)
