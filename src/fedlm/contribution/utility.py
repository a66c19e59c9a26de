"""The value of a coalition of a round's clients: minus the validation loss of the model the round would have made
from that coalition's updates alone, with the run's own LoRA mode and aggregator (a copy holding the aggregator's
state from before the round), on the round's starting global state. Nothing is retrained: the round's updates are
re-aggregated (GTG-Shapley's "reconstructed" sub-models, Liu et al. 2022, Sec. 4; Song, Tong & Wei 2019)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from fedlm.aggregation.base import Aggregator
from fedlm.aggregation.lora.mode import LoraMode
from fedlm.contribution.shapley import Coalition
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientUpdate, TensorDict


@dataclass
class RoundGame:
    """One round's coalition game: ``value(S)`` = -loss(aggregate of S's updates); ``value({})`` = -loss(start)."""

    start_state: TensorDict
    tasks: Mapping[str, ClientTask]
    updates: Sequence[ClientUpdate]
    aggregator: Aggregator  # the aggregator as it was before the round; copied for every coalition
    lora: LoraMode
    client_ranks: Mapping[str, int | None]
    loss: Callable[[TensorDict], float]

    @property
    def players(self) -> list[str]:
        """The round's clients with an accepted update, in round order."""
        return [u.client_id for u in self.updates]

    def model_of(self, coalition: Coalition) -> TensorDict:
        """The global state the round would have produced from ``coalition``'s updates (the start state for none)."""
        chosen = [u for u in self.updates if u.client_id in coalition]
        if not chosen:
            return self.start_state
        starts = {client: task.state for client, task in self.tasks.items()}
        space, space_updates = self.lora.to_server_space(self.start_state, chosen, starts, self.client_ranks)
        result = copy.deepcopy(self.aggregator).aggregate(space, space_updates)
        state, _ = self.lora.from_server_space(result.params, self.start_state)
        return state

    def __call__(self, coalition: Coalition) -> float:
        return -self.loss(self.model_of(coalition))
