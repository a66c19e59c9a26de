"""One round's contribution scores by every configured method, over one shared price list: a coalition priced for
one method is not priced again for another, but each method's cost counts the coalitions it asked for, as if it
ran alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedlm.contribution.gtg import GtgSettings, gtg_shapley
from fedlm.contribution.loo import leave_one_out
from fedlm.contribution.shapley import CachedUtility, Utility, exact_shapley


@dataclass
class MethodScores:
    """One method's scores of a round and the coalitions it priced (its cost)."""

    scores: dict[str, float]
    coalitions: int
    details: dict[str, Any] = field(default_factory=dict)


def score_round(players: Sequence[str], utility: Utility, methods: Sequence[str], gtg: GtgSettings, seed: int) -> dict[str, MethodScores]:
    """Each method's scores of ``players`` under ``utility`` (priced once per coalition across methods)."""
    shared = utility if isinstance(utility, CachedUtility) else CachedUtility(utility)
    out: dict[str, MethodScores] = {}
    for method in methods:
        counted = CachedUtility(shared)
        if method == "exact":
            out[method] = MethodScores(exact_shapley(players, counted), counted.evaluations)
        elif method == "loo":
            counted(frozenset())  # v({}) is priced by every method, so each one's cost includes it
            out[method] = MethodScores(leave_one_out(players, counted), counted.evaluations)
        elif method == "gtg":
            result = gtg_shapley(players, counted, gtg, seed)
            details = {"permutations": result.permutations, "round_truncated": result.round_truncated}
            out[method] = MethodScores(result.values, counted.evaluations, details)
        else:
            raise ValueError(f"unknown contribution method {method!r}; valid: exact, gtg, loo")
    return out
