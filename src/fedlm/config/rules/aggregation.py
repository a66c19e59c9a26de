"""Rules on the aggregator's parameters and the attack it must withstand."""

from __future__ import annotations

from fedlm.attacks import build_attack_params
from fedlm.attacks.harness import worst_round_attackers
from fedlm.config.rules.setting import Setting
from fedlm.core.errors import FedlmError

# ------------------------------------------------------------------------------------------ aggregation, attacks


def aggregator_accepts_config(s: Setting) -> None:
    """A known aggregator with valid parameters, and settings it can honour (its own ``check_config``)."""
    s.aggregator.check_config(s.config)


def attack_parameters_valid(s: Setting) -> None:
    """The attack's parameters are checked by the attack at load, not when the first attacker trains."""
    if s.config.attack.name is not None:
        build_attack_params(s.config.attack.name, s.config.attack.params())


def attackers_within_bounds(s: Setting) -> None:
    """A robust aggregator bounds only so many attackers per round (its declared ``byzantine_bound``), and ALIE's
    perturbation is defined for a minority of attackers; refuse an attacker share beyond either."""
    config, n = s.config, s.num_clients
    if config.attack.name is None or n is None:
        return
    k, f = worst_round_attackers(config, n)
    who = f"`attack.fraction` {config.attack.fraction} of {n} clients" if config.attack.fraction else f"`attack.clients` ({f})"
    name, bound = config.aggregation.name, s.aggregator.byzantine_bound
    if bound is not None:
        assumed = int(getattr(s.aggregator.params, bound.assumed_param, 0)) if bound.assumed_param else 0
        f_bound = max(f, assumed)
        if not bound.holds(k, f_bound):
            raise FedlmError(
                f"{who} gives up to f = {f_bound} attackers among the K = {k} updates of a round, but "
                f"`aggregation.name: {name}` bounds them only when {bound.formula(f_bound)} ({bound.source}); "
                "lower the attacker share or raise `federation.clients_per_round`"
            )
    if config.attack.name == "alie" and 2 * f >= k:
        raise FedlmError(
            f"`attack.name: alie` needs the attackers to be a minority of a round (2f < n), but {who} gives up to "
            f"f = {f} of n = {k}; lower the attacker share or raise `federation.clients_per_round`"
        )
