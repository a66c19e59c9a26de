"""Coalition games and their exact Shapley values.

A round's game: the players are the round's clients, the value ``v(S)`` of a coalition ``S`` is the utility of the
model the round would have produced from the updates of ``S`` alone (``v({})``: the global model the round started
from). The Shapley value (Shapley 1953, "A Value for n-Person Games"; in data valuation Ghorbani & Zou 2019, eq. 1)

    phi_i = sum_{S subset of N \\ {i}} |S|! (n - |S| - 1)! / n! * (v(S u {i}) - v(S))

is the only attribution that is efficient (sum_i phi_i = v(N) - v({})), symmetric, null-player-free and additive.
Exact enumeration prices all 2^n coalitions: the reference the approximations are tested against, for small rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from math import factorial

Coalition = frozenset[str]
Utility = Callable[[Coalition], float]

#: The largest round exact enumeration accepts (2^6 = 64 coalitions, each one validation pass).
MAX_EXACT_PLAYERS = 6


class CachedUtility:
    """A utility that prices each coalition once and counts how many it priced (the cost of a method)."""

    def __init__(self, utility: Utility) -> None:
        self._utility = utility
        self._values: dict[Coalition, float] = {}

    def __call__(self, coalition: Coalition) -> float:
        key = frozenset(coalition)
        if key not in self._values:
            self._values[key] = float(self._utility(key))
        return self._values[key]

    @property
    def evaluations(self) -> int:
        """How many distinct coalitions have been priced."""
        return len(self._values)

    def priced(self) -> set[Coalition]:
        """The coalitions priced so far."""
        return set(self._values)


def shapley_weight(coalition_size: int, players: int) -> float:
    """|S|! (n - |S| - 1)! / n!: the weight of ``v(S u {i}) - v(S)`` in phi_i for |S| = ``coalition_size``."""
    return factorial(coalition_size) * factorial(players - coalition_size - 1) / factorial(players)


def exact_shapley(players: Sequence[str], utility: Utility, max_players: int = MAX_EXACT_PLAYERS) -> dict[str, float]:
    """Every player's Shapley value by enumerating the 2^n coalitions (refused above ``max_players``)."""
    names = list(dict.fromkeys(players))
    n = len(names)
    if n > max_players:
        raise ValueError(f"exact Shapley enumerates 2^n coalitions; {n} players is more than the {max_players} allowed")
    values: dict[str, float] = {}
    for player in names:
        others = [p for p in names if p != player]
        total = 0.0
        for size in range(n):
            weight = shapley_weight(size, n)
            for subset in combinations(others, size):
                coalition = frozenset(subset)
                total += weight * (utility(coalition | {player}) - utility(coalition))
        values[player] = total
    return values
