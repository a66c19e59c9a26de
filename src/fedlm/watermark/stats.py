"""The test of a verification: how unlikely is it that a model without the key answers this many triggers right?

Under the null hypothesis (the model was not trained on the key's triggers) each answer is right with probability
exactly p = 1/K, independently (the answers are uniform and independent draws from the key,
:mod:`fedlm.watermark.triggers`), so the number right X is Binomial(n, p) and the p-value of k right answers is the
upper tail P(X >= k) = sum_{j=k}^{n} C(n, j) p^j (1 - p)^(n - j), computed exactly in rationals.
"""

from __future__ import annotations

import math
from fractions import Fraction


def binomial_tail(k: int, n: int, p: Fraction | float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of ``k`` successes in ``n`` trials."""
    if not 0 <= p <= 1:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    q = Fraction(p)
    total = sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(k, n + 1))
    return float(total)
