"""After each round's aggregation: the round's contribution scores by every configured method, added to the round's
``aggregate`` record of ``metrics.jsonl`` (field ``contribution``) with the running totals and the cost, and kept for
``federation.sampling: contribution``."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedlm.aggregation.base import Aggregator
from fedlm.aggregation.lora.mode import LoraMode
from fedlm.contribution.gtg import GtgSettings
from fedlm.contribution.scores import score_round
from fedlm.contribution.shapley import CachedUtility
from fedlm.contribution.utility import RoundGame
from fedlm.contribution.validation import ValidationLoss
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.seeding import derive_seed
from fedlm.core.update import TensorDict
from fedlm.models.adapters import load_trainable_state
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole

FIELD = "contribution"  # the key of the scores in a round's aggregate record


@dataclass
class ContributionObserver(RoundObserver):
    """Scores every aggregated round; ``cumulative[method][client]`` sums a client's scores over the rounds (0 in a
    round it sat out). ``methods[0]`` is the one the contribution sampling follows."""

    client_names: Sequence[str]
    methods: Sequence[str]
    aggregator: Aggregator  # the run's (round) aggregator; copied before each round
    lora: LoraMode
    client_ranks: Mapping[str, int | None]
    loss: ValidationLoss
    gtg: GtgSettings
    seed: int
    log: MetricsLog
    console: RunConsole
    cumulative: dict[str, dict[str, float]] = field(default_factory=dict)
    _before: Aggregator | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.cumulative = {m: dict.fromkeys(self.client_names, 0.0) for m in self.methods}

    def on_start(self, state: TensorDict, start_round: int) -> None:
        self._before = copy.deepcopy(self.aggregator)
        for record in self.log.read():  # a resumed run: the totals of the rounds already scored
            scored = record.get(FIELD) if record.get("split") == "aggregate" else None
            if scored and int(record["round"]) <= start_round:
                for method, entry in scored["methods"].items():
                    if method in self.cumulative:
                        self.cumulative[method].update(entry["cumulative"])

    def on_round(self, record: RoundRecord) -> None:
        before = self._before if self._before is not None else copy.deepcopy(self.aggregator)
        self._before = copy.deepcopy(self.aggregator)  # the state the next round starts from
        if record.skipped or not record.accepted:
            return
        started, passes = time.perf_counter(), self.loss.forward_passes
        game = RoundGame(record.start_state, record.tasks, record.accepted, before, self.lora, self.client_ranks, self.loss)
        utility = CachedUtility(game)
        results = score_round(game.players, utility, self.methods, self.gtg, derive_seed(self.seed, "gtg-shapley", record.round))
        per_call = self.loss.passes_per_call
        entry: dict[str, Any] = {
            "primary": self.methods[0],
            "utility_start": utility(frozenset()),
            "utility_round": utility(frozenset(game.players)),
            "validation_examples": len(self.loss.examples),
            "coalitions_priced": utility.evaluations,
            "forward_passes": self.loss.forward_passes - passes,
            "time_s": time.perf_counter() - started,
            "methods": {},
        }
        for method, result in results.items():
            totals = self.cumulative[method]
            for client, score in result.scores.items():
                totals[client] = totals.get(client, 0.0) + score
            entry["methods"][method] = {
                "scores": result.scores,
                "cumulative": dict(totals),
                "coalitions": result.coalitions,
                "forward_passes": result.coalitions * per_call,
                **result.details,
            }
        record.fields[FIELD] = entry
        load_trainable_state(self.loss.model, record.state)  # the shared model held the last coalition priced
        primary = results[self.methods[0]].scores
        shown = ", ".join(f"{c} {primary[c]:+.4g}" for c in game.players)
        self.console.print(
            f"round {record.round}: contribution ({self.methods[0]}) {shown}; {utility.evaluations} coalitions, "
            f"{entry['forward_passes']} forward passes, {entry['time_s']:.1f}s"
        )

    def scores_for_sampling(self) -> dict[str, float]:
        """Every client's cumulative score by the primary method."""
        return dict(self.cumulative[self.methods[0]])
