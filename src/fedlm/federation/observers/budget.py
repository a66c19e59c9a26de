"""``federation.max_mib``: a communication budget over the whole run (every client's uploads and downloads).

After each round the observer adds the round's bytes (as logged, i.e. the encoded sizes under compression) to what
was spent; when one more round of the same cost would exceed the budget, it stops the run with
:class:`BudgetReached`, which the run turns into a clean end (final adapter, report). The first round always runs:
its cost is not known before it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.update import TensorDict
from fedlm.reporting.metrics_log import MetricsLog

MIB = 2**20


class BudgetReached(Exception):  # noqa: N818 - a stop signal, not an error
    """The next round would exceed ``federation.max_mib``; carries the state to finish the run with."""

    def __init__(self, state: TensorDict, round_num: int, spent_bytes: float, next_bytes: float, max_bytes: float) -> None:
        super().__init__(
            f"communication budget `federation.max_mib` {max_bytes / MIB:g} MiB: {spent_bytes / MIB:.3f} MiB spent after round "
            f"{round_num}, the next round would add about {next_bytes / MIB:.3f} MiB; stopping"
        )
        self.state, self.round, self.spent_bytes = state, round_num, spent_bytes


@dataclass
class CommunicationBudget(RoundObserver):
    """Stops the run before a round that would take the bytes moved over ``max_mib``."""

    max_mib: float
    rounds: int
    log: MetricsLog
    spent: float = 0.0

    def on_start(self, state: TensorDict, start_round: int) -> None:
        """Count what the rounds already in ``metrics.jsonl`` moved (a resumed run)."""
        records = self.log.read() if self.log.path.is_file() else []
        self.spent = float(
            sum(r["upload_bytes"] + r["download_bytes"] for r in records if r.get("split") == "aggregate" and r["round"] <= start_round)
        )

    def on_round(self, record: RoundRecord) -> None:
        cost = float(sum(row["upload_bytes"] + row["download_bytes"] for row in record.traffic.values()))
        self.spent += cost
        limit = self.max_mib * MIB
        if record.round < self.rounds and self.spent + cost > limit:
            raise BudgetReached(record.state, record.round, self.spent, cost, limit)
