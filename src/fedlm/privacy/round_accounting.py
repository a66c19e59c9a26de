"""Privacy accounting as a round observer: the epsilon spent so far, in every round's record (every sampled round
is spent, aggregated or skipped)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fedlm.core.round import RoundObserver, RoundRecord


class EpsilonAccount(Protocol):
    """Differential-privacy accounting of a run: epsilon at ``delta`` after a number of rounds."""

    delta: float

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon spent after ``rounds`` rounds."""
        ...


@dataclass
class EpsilonObserver(RoundObserver):
    """Adds ``epsilon`` and ``delta`` to the round's aggregation metrics."""

    account: EpsilonAccount

    def on_round(self, record: RoundRecord) -> None:
        record.metrics["epsilon"] = self.account.epsilon_after(record.round)
        record.metrics["delta"] = self.account.delta
