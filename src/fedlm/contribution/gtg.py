"""GTG-Shapley: Monte-Carlo Shapley values of one round with guided sampling and truncation.

Liu, Chen, Yu, Liu & Cui 2022, "GTG-Shapley: Efficient and Accurate Participant Contribution Evaluation in
Federated Learning", ACM TIST 13(4), Algorithm 1. The value of a coalition is computed from the round's updates
(the aggregate of the coalition's updates on the round's starting model, scored on the server's validation set), so
nothing is retrained. Per round:

1. Between-round truncation: when |v(N) - v({})| < ``round_truncation`` the round changed the model too little to
   attribute, and every client scores 0 (no further coalition is priced).
2. Guided Monte-Carlo sampling: permutation k puts client k mod n first and orders the others at random, so every
   client leads equally often (the early positions carry the largest marginal gains).
3. Within-round truncation: walking a permutation, once the coalition's value is within ``truncation`` of v(N)
   the remaining clients' marginal gains are taken as 0 and their coalitions are not priced. fedlm states the
   threshold relative to |v(N) - v({})| (the paper gives an absolute one), so one setting fits any loss scale.
4. phi_i is the mean of i's marginal gains over the permutations; sampling stops after ``max_permutations``, or once a
   full cycle of n more permutations moved the estimates by less than ``tolerance`` (relative, summed over clients).

With ``truncation = 0`` every permutation's gains sum to v(N) - v({}), so the estimate is efficient, and it is the
exact Shapley value whenever all n! orders are averaged, or the game is additive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlm.contribution.shapley import Utility
from fedlm.core.seeding import torch_generator


@dataclass(frozen=True)
class GtgSettings:
    """GTG-Shapley's knobs (``contribution.gtg``)."""

    max_permutations: int = 50
    truncation: float = 0.01  # within-round, relative to |v(N) - v({})|
    round_truncation: float = 1e-6  # between-round, absolute change of the utility
    tolerance: float = 0.05  # convergence: relative change of the estimates over one cycle of n permutations


@dataclass
class GtgResult:
    """The estimates and how they were reached."""

    values: dict[str, float]
    permutations: int
    round_truncated: bool


def gtg_shapley(players: Sequence[str], utility: Utility, settings: GtgSettings, seed: int) -> GtgResult:
    """GTG-Shapley estimates of every player's Shapley value under ``utility`` (seeded, deterministic)."""
    names = list(dict.fromkeys(players))
    n = len(names)
    empty, full = utility(frozenset()), utility(frozenset(names))
    gain = full - empty
    if abs(gain) < settings.round_truncation or n == 0:
        return GtgResult(dict.fromkeys(names, 0.0), 0, True)
    generator = torch_generator(seed)
    sums = dict.fromkeys(names, 0.0)
    previous: dict[str, float] | None = None
    k = 0
    while k < settings.max_permutations:
        order = _guided_permutation(names, k, generator)
        k += 1
        for player, marginal in zip(order, _marginals(order, utility, empty, full, settings.truncation * abs(gain))):
            sums[player] += marginal
        if k % n == 0:  # a full cycle: every client has led once more
            current = {p: s / k for p, s in sums.items()}
            if previous is not None and _relative_change(previous, current) < settings.tolerance:
                break
            previous = current
    return GtgResult({p: s / k for p, s in sums.items()}, k, False)


def _guided_permutation(names: list[str], k: int, generator: torch.Generator) -> list[str]:
    """Client ``k mod n`` first, the others in a seeded random order (the paper's guided sampling)."""
    first = names[k % len(names)]
    rest = [p for p in names if p != first]
    return [first, *(rest[i] for i in torch.randperm(len(rest), generator=generator).tolist())]


def _marginals(order: list[str], utility: Utility, empty: float, full: float, threshold: float) -> list[float]:
    """Each player's marginal gain along ``order``, truncated once the value is within ``threshold`` of v(N)."""
    gains: list[float] = []
    coalition: frozenset[str] = frozenset()
    value = empty
    for player in order:
        coalition = coalition | {player}
        if abs(full - value) < threshold:
            gains.append(0.0)  # truncated: the rest of the permutation adds (about) nothing
            continue
        new = utility(coalition)
        gains.append(new - value)
        value = new
    return gains


def _relative_change(before: dict[str, float], after: dict[str, float]) -> float:
    """sum_i |after_i - before_i| / sum_i |after_i| (0 when both are all zero)."""
    scale = sum(abs(v) for v in after.values())
    moved = sum(abs(after[p] - before[p]) for p in after)
    return moved / scale if scale > 0 else 0.0
