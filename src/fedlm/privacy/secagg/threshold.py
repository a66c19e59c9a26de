"""SecAgg+ sizes: who holds shares of a client's secrets, and how many shares rebuild them (the threshold).

Pure arithmetic on the ``privacy.secure_aggregation`` section; the rules that refuse a bad threshold live in
:mod:`fedlm.config.rules`.
"""

from __future__ import annotations

import math

from fedlm.config.schema import SecureAggregationConfig


def share_holders(sa: SecureAggregationConfig, clients_per_round: int) -> int:
    """How many clients hold shares of each client's secrets: its neighbours (all others without ``neighbours``)
    and itself."""
    k = sa.neighbours if sa.neighbours is not None else clients_per_round - 1
    return min(k, clients_per_round - 1) + 1


def threshold(sa: SecureAggregationConfig, clients_per_round: int) -> int:
    """The configured threshold, else two thirds of the share holders rounded up (at least 2)."""
    if sa.threshold is not None:
        return sa.threshold
    return max(2, math.ceil(2 * share_holders(sa, clients_per_round) / 3))
