"""What one finished round hands to its observers, and the observer contract.

A per-round concern (traffic, privacy accounting, the audit's saved client models, attack outcomes, the metrics log,
evaluation, checkpoints) is a :class:`RoundObserver` attached when the run is built; the round itself never changes
for it. Observers run in the order they were attached, so one may add fields that a later one (the metrics log)
writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate, TensorDict


@dataclass
class RoundRecord:
    """One round, as its observers see it.

    Attributes:
        round: The round (1-based).
        chosen: The sampled clients, in sampling order.
        tasks: What each chosen client received (plan, starting state, extras).
        received: Every update that arrived (before validation).
        accepted: The updates that passed validation (what the aggregation saw).
        failures: Clients without a usable update, and why (failed, unreachable, rejected).
        start_state: The global state the round started from (what the tasks were cut from).
        state: The global state after the round (unchanged when ``skipped``).
        skipped: True when the round aggregated nothing (too few updates, or secure aggregation aborted).
        metrics: What the aggregation step reported; observers may add to it (logged under ``aggregation``).
        train_time_s: Seconds from sending the tasks to the new global state.
        protocol_bytes: Under secure aggregation, each client's (upload, download) bytes of the protocol, which replace
            the plain upload.
        traffic: Each client's ``download_bytes``, ``upload_bytes``, ... (filled by the traffic observer).
        fields: Extra top-level fields of the round's ``metrics.jsonl`` record (e.g. ``attack``).
    """

    round: int
    chosen: list[str]
    tasks: Mapping[str, ClientTask]
    received: list[ClientUpdate]
    accepted: list[ClientUpdate]
    failures: list[ClientFailure]
    start_state: TensorDict
    state: TensorDict
    skipped: bool
    metrics: dict[str, Any]
    train_time_s: float
    protocol_bytes: Mapping[str, tuple[int, int]] | None = None
    traffic: dict[str, dict[str, float]] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)


class RoundObserver:
    """Something that happens around every round without being part of it; every default does nothing."""

    def on_start(self, state: TensorDict, start_round: int) -> None:
        """Called once before the first round of this process (``start_round``: 0, or the resumed round)."""

    def on_round(self, record: RoundRecord) -> None:
        """Called after each round with what it did."""
