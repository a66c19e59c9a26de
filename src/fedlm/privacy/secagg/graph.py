"""Who masks with whom: the communication graph of SecAgg+ (Bell, Bonawitz, Gascon, Lepoint & Raykova 2020,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS, Sec. 3-4).

SecAgg (Bonawitz et al. 2017) masks every pair of clients: O(n^2) work. SecAgg+ replaces the complete graph by a
random k-regular one: the Harary graph H(k, n) (each node joined to the k/2 nearest on either side of a cycle)
over a random permutation of the clients, drawn per round from public randomness. Each client then agrees masks
and shares its secrets only with its k neighbours.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def neighbours(clients: Sequence[int], k: int | None, seed: int) -> dict[int, list[int]]:
    """Each client's neighbours: all others when ``k`` is None or >= n - 1, else H(k, n) on a seeded permutation.

    ``k`` must be even (k/2 on each side of the cycle).
    """
    ids = sorted(clients)
    n = len(ids)
    if k is None or k >= n - 1:
        return {c: [d for d in ids if d != c] for c in ids}
    if k % 2:
        raise ValueError(f"SecAgg+ needs an even number of neighbours (k/2 each side of the Harary cycle), got {k}")
    order = ids[:]
    random.Random(seed).shuffle(order)
    out: dict[int, set[int]] = {c: set() for c in ids}
    for pos, c in enumerate(order):
        for hop in range(1, k // 2 + 1):
            d = order[(pos + hop) % n]
            out[c].add(d)
            out[d].add(c)
    return {c: sorted(v) for c, v in out.items()}
