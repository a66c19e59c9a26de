"""Planning client-level DP: which noise multiplier gives epsilon <= X after N rounds with K of M clients per round.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent Language Models")
samples each client with probability ``q = K / M`` per round and adds Gaussian noise with multiplier sigma to the
sum of clipped updates; :mod:`fedlm.privacy.accounting` prices N such rounds. A plan answers either direction:

- target epsilon -> the smallest sigma that reaches it (solved with one accountant, rounded up to 4 significant
  digits so the sigma shown is itself feasible), or
- sigma -> the epsilon it spends,

and always reports the epsilon under both accountants (RDP, the looser classic; PLD, near exact) at the sigma shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedlm.privacy.accounting import (
    ACCOUNTANTS,
    AccountantName,
    PrivacyParameterError,
    epsilon,
    noise_for_epsilon,
)

SIGMA_DIGITS = 4
"""Significant digits of a solved noise multiplier; it is rounded up, so it stays feasible."""


@dataclass(frozen=True)
class PrivacyPlan:
    """A noise multiplier and what it spends over ``rounds`` rounds of client-level DP."""

    noise_multiplier: float
    epsilon_rdp: float
    epsilon_pld: float
    sampling_rate: float
    rounds: int
    delta: float
    clients_per_round: int
    num_clients: int
    target_epsilon: float | None = None
    solved_with: AccountantName | None = None
    notes: tuple[str, ...] = ()


def client_sampling_rate(clients_per_round: int, num_clients: int) -> float:
    """``q = clients_per_round / num_clients``, the per-round probability that a given client takes part."""
    for name, value in (("clients_per_round", clients_per_round), ("num_clients", num_clients)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PrivacyParameterError(f"`{name}` must be a whole number >= 1, got {value!r}")
    if clients_per_round > num_clients:
        raise PrivacyParameterError(f"`clients_per_round` ({clients_per_round}) must be <= `num_clients` ({num_clients})")
    return clients_per_round / num_clients


def round_up(value: float, digits: int = SIGMA_DIGITS) -> float:
    """``value`` rounded up (towards +inf) to ``digits`` significant digits; 0 stays 0."""
    if value <= 0 or not math.isfinite(value):
        return value
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale - 1e-9) / scale


def _notes(delta: float, num_clients: int) -> tuple[str, ...]:
    """Warnings a planner should see next to the numbers."""
    if delta >= 1 / num_clients:
        return (
            f"delta {delta:g} >= 1/num_clients ({1 / num_clients:.3g}): a mechanism that reveals one whole client "
            "would still meet it; choose delta well below 1/num_clients",
        )
    return ()


def plan_client_dp(
    *,
    rounds: int,
    clients_per_round: int,
    num_clients: int,
    delta: float,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    accountant: AccountantName = "rdp",
) -> PrivacyPlan:
    """Solve for sigma given ``target_epsilon`` (with ``accountant``), or price the given ``noise_multiplier``.

    Exactly one of ``target_epsilon`` and ``noise_multiplier`` must be given. Raises
    :class:`~fedlm.privacy.accounting.PrivacyParameterError` (a FedlmError) on bad input or an unreachable target.
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise PrivacyParameterError(
            "give exactly one of `epsilon` (to solve for the noise multiplier) and `noise_multiplier` (to report its epsilon)"
        )
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PrivacyParameterError(f"`rounds` must be a whole number >= 1, got {rounds!r}")
    if accountant not in ACCOUNTANTS:
        raise PrivacyParameterError(f"`accountant` must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    q = client_sampling_rate(clients_per_round, num_clients)
    solved_with: AccountantName | None = None
    if target_epsilon is not None:
        sigma = round_up(noise_for_epsilon(target_epsilon, q, rounds, delta, accountant))
        solved_with = accountant
    else:
        sigma = noise_multiplier  # type: ignore[assignment]
    return PrivacyPlan(
        noise_multiplier=sigma,
        epsilon_rdp=epsilon(sigma, q, rounds, delta, "rdp"),
        epsilon_pld=epsilon(sigma, q, rounds, delta, "pld"),
        sampling_rate=q,
        rounds=rounds,
        delta=delta,
        clients_per_round=clients_per_round,
        num_clients=num_clients,
        target_epsilon=target_epsilon,
        solved_with=solved_with,
        notes=_notes(delta, num_clients),
    )
