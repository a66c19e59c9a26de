"""The client side of a continual run in the simulation: what each client trains on this round, and its own state.

:class:`ContinualRuntime` wraps the in-process runtime (inside every server-side wrapper). Before a client trains it
puts the client's current data where the inner runtime reads it: the slices it holds this round
(:class:`~fedlm.continual.schedule.Stream`) plus, under rehearsal, the replayed records of the slices it no longer
holds; under EWC it hands the client's Fisher and anchor to the trainer hook. After the client trains, its new state
(replay buffer, EWC state) is written as a version in ``RUN_DIR/clients/<name>/state/round_NNNN.safetensors``
(:class:`~fedlm.personalization.store.ClientStore`): a resumed run drops the versions after its checkpoint and reads
exactly what the uninterrupted run read.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlm.config.schema.continual import ContinualConfig
from fedlm.continual.data import ContinualData
from fedlm.continual.ewc import EWCHook, EWCState
from fedlm.continual.rehearsal import ReplayBuffer
from fedlm.continual.schedule import Stream
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.runtime import Runtime
from fedlm.core.seeding import derive_seed
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate, TensorDict
from fedlm.federation.checkpoint import list_checkpoints
from fedlm.personalization.store import ClientStore


@dataclass
class ContinualRuntime(RoundObserver):
    """Runs ``inner`` (which reads each client's examples from ``current``) on the stream's data of the round."""

    inner: Runtime
    stream: Stream
    data: ContinualData
    current: MutableMapping[str, Sequence[Any]]
    store: ClientStore
    checkpoints: Path
    config: ContinualConfig
    seed: int
    ewc: EWCHook | None = None

    @property
    def rehearsal(self) -> bool:
        return "rehearsal" in self.config.mitigations

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> Sequence[ClientUpdate | ClientFailure]:
        """Each client trains, one at a time, on its data of the round; its state is saved when it changed."""
        results: list[ClientUpdate | ClientFailure] = []
        for client, task in tasks.items():
            round_num = task.plan.round
            saved = self.store.latest(client, before=round_num)
            held = [self.stream.slices.index(s) for s in self.stream.held(client, round_num)]
            mine = self.data.slices.get(client, {})
            fresh = [ex for i in held for ex in mine.get(self.stream.slices[i], [])]
            buffer = ReplayBuffer.from_tensors(self.config.rehearsal.buffer_size, saved) if self.rehearsal else None
            replayed = [mine[self.stream.slices[i]][j] for i, j in buffer.replay(held)] if buffer is not None else []
            self.current[client] = fresh + replayed
            ewc = EWCState.from_tensors(saved) if self.ewc is not None else None
            if self.ewc is not None and ewc is not None:
                ewc.begin_slices(held, self.config.ewc.gamma)
                self.ewc.use(ewc, fresh, held, derive_seed(self.seed, "ewc-fisher", round_num, client))
            trained = self.inner.train_clients({client: task})
            for result in trained:
                if isinstance(result, ClientUpdate):
                    result.metrics["replayed_examples"] = float(len(replayed))
                    self._save(client, round_num, held, buffer, ewc)
            results.extend(trained)
        return results

    def _save(self, client: str, round_num: int, held: Sequence[int], buffer: ReplayBuffer | None, ewc: EWCState | None) -> None:
        """Offer the client's newly trained slices to its buffer and write its state after ``round_num``."""
        state: TensorDict = {}
        if buffer is not None:
            for i in held:
                size = len(self.data.slices.get(client, {}).get(self.stream.slices[i], []))
                buffer.offer_slice(i, size, derive_seed(self.seed, "replay", client, self.stream.slices[i]))
            state.update(buffer.to_tensors())
        if ewc is not None:
            state.update(ewc.to_tensors())
        if state:
            self.store.save(client, round_num, state)

    def on_start(self, state: TensorDict, start_round: int) -> None:
        self.store.rollback(start_round)

    def on_round(self, record: RoundRecord) -> None:
        rounds = [int(p.name.removeprefix("round_")) for p in list_checkpoints(self.checkpoints)]
        self.store.prune(rounds)
