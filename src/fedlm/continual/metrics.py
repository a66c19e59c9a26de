"""Forgetting measures from the accuracy matrix (pure math, no model).

``R[k][j]``: the score on slice j's test records after stage k (stage 0: the starting model, before any training);
``own[j]``: the stage in which slice j first arrives. Scores are "higher is better": a loss enters as its negative.
With several slices arriving in one stage, the sums below run over slices instead of tasks.

- Average accuracy after stage k (Chaudhry et al. 2018, "Riemannian Walk", Eq. 3): ``A_k = mean_{j: own_j <= k} R[k][j]``.
- Forgetting of slice j after stage k (ibid., Eq. 4): ``f_j^k = max_{l in 1..k-1} R[l][j] - R[k][j]``; average
  forgetting (Eq. 5): ``F_k = mean_{j: own_j < k} f_j^k``.
- Backward transfer (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory", Eq. 3):
  ``BWT = mean_{j: own_j < T} (R[T][j] - R[own_j][j])``; negative values are forgetting.
- Forward transfer (ibid., Eq. 3): ``FWT = mean_{j: own_j >= 2} (R[own_j - 1][j] - b_j)``, ``b_j = R[0][j]``.
"""

from __future__ import annotations

from collections.abc import Mapping

Matrix = Mapping[int, Mapping[str, float]]  # stage -> slice -> score (higher is better)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def average_accuracy(scores: Matrix, own: Mapping[str, int], k: int) -> float | None:
    """``A_k``: the mean score after stage ``k`` over the slices arrived by then."""
    return _mean([scores[k][j] for j, s in own.items() if s <= k and j in scores.get(k, {})])


def forgetting(scores: Matrix, own: Mapping[str, int], k: int, j: str) -> float:
    """``f_j^k = max_{l in 1..k-1} R[l][j] - R[k][j]`` (Chaudhry et al. 2018, Eq. 4)."""
    best = max(scores[stage][j] for stage in range(1, k) if j in scores.get(stage, {}))
    return best - scores[k][j]


def average_forgetting(scores: Matrix, own: Mapping[str, int], k: int) -> float | None:
    """``F_k``: the mean forgetting after stage ``k`` of the slices that arrived before it (None at stage 1)."""
    return _mean([forgetting(scores, own, k, j) for j, s in own.items() if s < k and j in scores.get(k, {})])


def backward_transfer(scores: Matrix, own: Mapping[str, int], last: int) -> float | None:
    """BWT after stage ``last``: the mean change on earlier slices since their own stage (Lopez-Paz & Ranzato 2017)."""
    return _mean([scores[last][j] - scores[s][j] for j, s in own.items() if s < last and j in scores.get(last, {}) and j in scores.get(s, {})])


def forward_transfer(scores: Matrix, own: Mapping[str, int], last: int) -> float | None:
    """FWT up to stage ``last``: the mean score on each later slice just before it arrives, minus the starting model's
    (None without the stage-0 row)."""
    if 0 not in scores:
        return None
    return _mean([scores[s - 1][j] - scores[0][j] for j, s in own.items() if 2 <= s <= last and j in scores.get(s - 1, {}) and j in scores[0]])


def transfer_summary(scores: Matrix, own: Mapping[str, int], k: int) -> dict[str, float | None]:
    """After stage ``k``: ``acc`` (A_k), ``forgetting`` (F_k), ``bwt`` and ``fwt`` taking k as the last stage."""
    return {
        "acc": average_accuracy(scores, own, k),
        "forgetting": average_forgetting(scores, own, k),
        "bwt": backward_transfer(scores, own, k),
        "fwt": forward_transfer(scores, own, k),
    }
