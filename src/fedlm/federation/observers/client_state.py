"""Per-client state on disk in the simulation: the :class:`~fedlm.core.client_state.ClientStates` an aggregator and its
wrappers hold (SCAFFOLD's c_i, error-feedback residuals) are spilled to ``RUN_DIR/clients/<name>/<kind>/`` when the
run starts, so only the round's clients' state is read into memory, and their versions are kept in step with the
checkpoints (rolled back on resume, pruned to what a kept checkpoint needs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedlm.aggregation.base import Aggregator
from fedlm.core.client_state import ClientStates, DiskVersions
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.update import TensorDict
from fedlm.federation.checkpoint import list_checkpoints


def client_states_of(aggregator: Aggregator) -> list[tuple[str, ClientStates]]:
    """(attribute name, store) of every :class:`ClientStates` held by ``aggregator`` or the aggregators it wraps
    (followed through their ``inner``)."""
    found: list[tuple[str, ClientStates]] = []
    seen: set[int] = set()
    current: object = aggregator
    while isinstance(current, Aggregator) and id(current) not in seen:
        seen.add(id(current))
        found += [(name, value) for name, value in vars(current).items() if isinstance(value, ClientStates)]
        current = getattr(current, "inner", None)
    return found


@dataclass
class ClientStateSpill(RoundObserver):
    """Spills the stores at the start of the run (after a resume's rollback) and advances their write round."""

    stores: list[tuple[ClientStates, DiskVersions]]
    checkpoints: Path

    def on_start(self, state: TensorDict, start_round: int) -> None:
        for store, disk in self.stores:
            store.spill(disk, start_round)

    def on_round(self, record: RoundRecord) -> None:
        rounds = [int(p.name.removeprefix("round_")) for p in list_checkpoints(self.checkpoints)]
        for store, disk in self.stores:
            store.round = record.round + 1
            disk.prune(rounds)


def spill_client_states(aggregator: Aggregator, clients_root: Path, checkpoints: Path) -> ClientStateSpill | None:
    """The observer that keeps ``aggregator``'s per-client states under ``clients_root`` (None when it has none)."""
    found = client_states_of(aggregator)
    if not found:
        return None
    return ClientStateSpill([(store, DiskVersions(clients_root, name)) for name, store in found], checkpoints)
