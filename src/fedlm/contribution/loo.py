"""Leave-one-out contribution: phi_i = v(N) - v(N \\ {i}).

The classic baseline of data valuation (Cook 1977's influence by deletion; as a federated contribution score e.g.
Wang, Rong, Xiong & Yu 2019, "Measure Contribution of Participants in Federated Learning", Sec. 3.1). It costs n + 1
coalitions a round, but it is not a Shapley value: two clients with the same data each look useless (leaving one out
loses nothing), and the scores need not sum to v(N) - v({}).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlm.contribution.shapley import Utility


def leave_one_out(players: Sequence[str], utility: Utility) -> dict[str, float]:
    """Each player's v(N) - v(N without it)."""
    everyone = frozenset(players)
    full = utility(everyone)
    return {player: full - utility(everyone - {player}) for player in dict.fromkeys(players)}
