"""Rehearsal: a bounded per-client replay buffer of earlier slices' records, replayed beside the current data.

Experience replay with a tiny episodic memory filled by reservoir sampling (Chaudhry et al. 2019, "On Tiny Episodic
Memories in Continual Learning", Sec. 3; reservoir sampling: Vitter 1985, Algorithm R): every example a client trains
on is offered once, when its slice is first trained; the buffer keeps a uniform sample of ``capacity`` of all examples
offered so far. Each round the client trains on its current slices plus the buffered examples of the slices it no
longer holds. The buffer stays with the client (``RUN_DIR/clients/<name>/state/``): it names examples of the
client's own data by (slice, position), never leaves the client, and is saved each round it changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from fedlm.core.seeding import torch_generator
from fedlm.core.update import TensorDict

Item = tuple[int, int]  # (slice index in the stream's order, example index within the client's slice)


def reservoir_offer(buffer: list[Item], seen: int, items: Iterable[Item], capacity: int, generator: torch.Generator) -> int:
    """Offer ``items`` in order to the reservoir ``buffer`` (changed in place) that has seen ``seen`` items; returns
    the new count. Item t (0-based over all offers) enters while the buffer has room, later with probability
    ``capacity / (t + 1)`` in place of a uniformly chosen entry (Algorithm R)."""
    for item in items:
        if seen < capacity:
            buffer.append(item)
        else:
            j = int(torch.randint(0, seen + 1, (1,), generator=generator))
            if j < capacity:
                buffer[j] = item
        seen += 1
    return seen


@dataclass
class ReplayBuffer:
    """One client's reservoir: its items, how many examples were offered, and which slices were offered."""

    capacity: int
    items: list[Item] = field(default_factory=list)
    seen: int = 0
    offered: set[int] = field(default_factory=set)

    def offer_slice(self, slice_index: int, size: int, seed: int) -> None:
        """Offer the ``size`` examples of slice ``slice_index`` once (a slice already offered is skipped)."""
        if slice_index in self.offered:
            return
        self.offered.add(slice_index)
        self.seen = reservoir_offer(self.items, self.seen, ((slice_index, i) for i in range(size)), self.capacity, torch_generator(seed))

    def replay(self, held: Sequence[int]) -> list[Item]:
        """The buffered items of the slices not in ``held`` (those the client no longer has), in buffer order."""
        return [item for item in self.items if item[0] not in held]

    def to_tensors(self) -> TensorDict:
        """The buffer as tensors, for the client's saved state."""
        items = torch.tensor(self.items, dtype=torch.int64).reshape(-1, 2)
        offered = torch.tensor(sorted(self.offered), dtype=torch.int64)
        return {"replay.items": items, "replay.seen": torch.tensor([self.seen]), "replay.offered": offered}

    @classmethod
    def from_tensors(cls, capacity: int, state: TensorDict | None) -> ReplayBuffer:
        """The buffer saved by :meth:`to_tensors` (an empty one without a saved state)."""
        if state is None or "replay.items" not in state:
            return cls(capacity)
        items = [(int(a), int(b)) for a, b in state["replay.items"].tolist()]
        return cls(capacity, items, int(state["replay.seen"][0]), {int(s) for s in state["replay.offered"].tolist()})
