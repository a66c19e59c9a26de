"""``fedlm privacy ...``: plan client-level differential privacy before a run.

Registered in :mod:`fedlm.cli` with ``app.add_typer(privacy_app, name="privacy")``. Errors print one ``error:`` line
and exit with code 2 (``--debug`` shows the traceback), as every fedlm command does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

import typer

from fedlm.cli.guard import guarded
from fedlm.core.errors import FedlmError

if TYPE_CHECKING:
    from rich.table import Table

    from fedlm.privacy.plan import PrivacyPlan

DebugOpt = Annotated[bool, typer.Option("--debug", help="show full tracebacks")]

privacy_app = typer.Typer(no_args_is_help=True, help="Plan differential privacy: noise multiplier <-> epsilon.")


def _fmt_eps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4f}"


def plan_table(plan: PrivacyPlan) -> Table:
    """One row: sigma, epsilon under RDP and PLD, sampling rate, rounds, delta."""
    from rich.table import Table

    if plan.target_epsilon is not None:
        title = f"sigma for epsilon <= {plan.target_epsilon:g} ({plan.solved_with})"
    else:
        title = f"epsilon at sigma {plan.noise_multiplier:g}"
    table = Table(title=f"{title}, {plan.clients_per_round} of {plan.num_clients} clients/round, {plan.rounds} rounds")
    for name in ("noise multiplier (sigma)", "epsilon (RDP)", "epsilon (PLD)", "q", "rounds", "delta"):
        table.add_column(name, justify="right")
    table.add_row(
        f"{plan.noise_multiplier:g}",
        _fmt_eps(plan.epsilon_rdp),
        _fmt_eps(plan.epsilon_pld),
        f"{plan.sampling_rate:.4g}",
        str(plan.rounds),
        f"{plan.delta:g}",
    )
    return table


@privacy_app.command("plan")
def plan(
    rounds: Annotated[int, typer.Option("--rounds", help="federated rounds N")],
    clients_per_round: Annotated[int, typer.Option("--clients-per-round", help="clients sampled per round K")],
    num_clients: Annotated[int, typer.Option("--num-clients", help="clients in the population M")],
    epsilon: Annotated[float | None, typer.Option("--epsilon", help="target epsilon X: report the noise multiplier that reaches it")] = None,
    noise_multiplier: Annotated[float | None, typer.Option("--noise-multiplier", help="noise multiplier sigma: report the epsilon it spends")] = None,
    delta: Annotated[float, typer.Option("--delta", help="delta of (epsilon, delta)-DP; well below 1/M")] = 1e-5,
    accountant: Annotated[str, typer.Option("--accountant", help="the accountant that solves for sigma: rdp | pld")] = ("rdp"),
    debug: DebugOpt = False,
) -> None:
    """Which noise multiplier gives epsilon <= X after N rounds with K of M clients per round (or the reverse)."""

    def action() -> None:
        try:
            from fedlm.privacy.plan import plan_client_dp
        except ModuleNotFoundError as exc:
            if exc.name != "dp_accounting":
                raise
            raise FedlmError("`fedlm privacy` needs dp-accounting: pip install dp-accounting==0.6.0") from None
        from rich.console import Console

        result = plan_client_dp(
            rounds=rounds,
            clients_per_round=clients_per_round,
            num_clients=num_clients,
            delta=delta,
            target_epsilon=epsilon,
            noise_multiplier=noise_multiplier,
            accountant=accountant,  # type: ignore[arg-type]
        )
        console = Console()
        console.print(plan_table(result))
        for note in result.notes:
            console.print(f"[yellow]note[/yellow]: {note}")

    guarded(debug, action)
