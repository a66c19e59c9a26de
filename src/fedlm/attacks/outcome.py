"""What an attack achieved in a round: which attackers took part and what the defences caught."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.update import ClientFailure


def attack_outcome(chosen: Sequence[str], attackers: frozenset[str], failures: Sequence[ClientFailure], excluded: Sequence[str]) -> dict[str, Any]:
    """Which attackers took part this round and what the defences caught: true and false positives."""
    left_out = set(excluded) | {f.client_id for f in failures if f.reason.startswith("rejected")}
    return {
        "malicious": sorted(set(chosen) & attackers),
        "excluded_malicious": sorted(left_out & attackers),
        "excluded_honest": sorted(left_out - attackers),
    }


@dataclass
class AttackOutcomeObserver(RoundObserver):
    """Adds the round's ``attack`` outcome to its record."""

    attackers: frozenset[str]

    def on_round(self, record: RoundRecord) -> None:
        record.fields["attack"] = attack_outcome(record.chosen, self.attackers, record.failures, record.metrics.get("excluded", []))
