"""When each client holds which slice, who is present in a round, and the stages of the stream.

A *slice* is the set of records sharing one value of ``continual.field`` (a time period, a task). Slices arrive at
a client at given rounds (``continual.schedule``, or ``stream: round``: slice k at round ``k * rounds_per_slice + 1``
for everyone). A client holds the slices that arrived last (``accumulate``: every slice arrived so far); the older
ones are gone, which is what makes a model forget (the task-incremental setting of Lopez-Paz & Ranzato 2017 and of
federated continual learning, Yoon et al. 2021). A client is *present* in round r when r lies in its membership
window and it holds at least one example; only present clients are sampled. A *stage* runs from one arrival round to
the round before the next: the accuracy matrix has one row per stage.

Everything here is a pure function of the config and the data's slice sizes, so a resumed run sees the same stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedlm.config.schema.continual import ContinualConfig
from fedlm.core.errors import FedlmError
from fedlm.core.sampling import sample_clients


@dataclass(frozen=True)
class Stage:
    """Rounds ``first..last`` (1-based, inclusive) and the slices that first arrive at its start."""

    index: int
    first: int
    last: int
    slices: tuple[str, ...]


@dataclass(frozen=True)
class Stream:
    """The resolved schedule of a run.

    Attributes:
        slices: Every slice, in time order (first arrival, then the configured order).
        arrivals: Per client: slice -> the round it arrives.
        windows: Per client: (first, last) round present.
        sizes: Per client: slice -> how many training examples of it the client has.
        rounds: The run's last round.
        accumulate: Whether a client keeps every slice that has arrived.
    """

    slices: tuple[str, ...]
    arrivals: Mapping[str, Mapping[str, int]]
    windows: Mapping[str, tuple[int, int]]
    sizes: Mapping[str, Mapping[str, int]]
    rounds: int
    accumulate: bool = False

    def held(self, client: str, round_num: int) -> tuple[str, ...]:
        """The slices ``client`` holds in ``round_num``, in time order (empty before its first arrival)."""
        arrived = {s: r for s, r in self.arrivals.get(client, {}).items() if r <= round_num}
        if not arrived:
            return ()
        newest = max(arrived.values())
        return tuple(s for s in self.slices if s in arrived and (self.accumulate or arrived[s] == newest))

    def present(self, clients: Sequence[str], round_num: int) -> list[str]:
        """The clients of ``clients`` in their membership window holding at least one example in ``round_num``."""
        out = []
        for client in clients:
            first, last = self.windows.get(client, (1, self.rounds))
            sizes = self.sizes.get(client, {})
            if first <= round_num <= last and any(sizes.get(s, 0) > 0 for s in self.held(client, round_num)):
                out.append(client)
        return out

    def stages(self) -> list[Stage]:
        """The stages: one per distinct arrival round, the last ending at the run's last round."""
        starts = sorted({r for arrivals in self.arrivals.values() for r in arrivals.values()})
        out = []
        for i, first in enumerate(starts):
            last = starts[i + 1] - 1 if i + 1 < len(starts) else self.rounds
            new = tuple(s for s in self.slices if self.first_arrival(s) == first)
            out.append(Stage(i + 1, first, last, new))
        return out

    def first_arrival(self, slice_name: str) -> int:
        """The first round any client holds ``slice_name``."""
        return min(a[slice_name] for a in self.arrivals.values() if slice_name in a)

    def stage_ending_at(self, round_num: int) -> Stage | None:
        """The stage whose last round is ``round_num`` (None: the stage goes on)."""
        return next((s for s in self.stages() if s.last == round_num), None)


@dataclass(frozen=True)
class StreamSampler:
    """Client sampling over the present clients only (uniform without replacement, as
    :func:`fedlm.core.sampling.sample_clients`, seeded by round)."""

    stream: Stream

    def __call__(self, client_names: Sequence[str], per_round: int | None, seed: int, round_num: int) -> list[str]:
        return sample_clients(self.stream.present(client_names, round_num), per_round, seed, round_num)


def wanted_slices(config: ContinualConfig) -> list[str]:
    """The slices the config names: ``slices``, else those of the schedule (by first arrival, then name)."""
    if config.slices is not None:
        return list(config.slices)
    first: dict[str, int] = {}
    for arrivals in (config.schedule or {}).values():
        for name, round_num in arrivals.items():
            first[name] = min(round_num, first.get(name, round_num))
    return sorted(first, key=lambda s: (first[s], s))


def build_stream(
    config: ContinualConfig, client_names: Sequence[str], sizes: Mapping[str, Mapping[str, int]], rounds: int, min_clients: int = 1
) -> Stream:
    """The stream of a run with ``client_names`` whose slice sizes are ``sizes``; a FedlmError names the field of a
    client, slice or round that does not exist, or a round with fewer than ``min_clients`` present clients."""
    slices = wanted_slices(config)
    names = list(client_names)
    if config.stream == "round":
        arrivals = {c: {s: k * config.rounds_per_slice + 1 for k, s in enumerate(slices)} for c in names}
        late = [s for s, r in arrivals[names[0]].items() if r > rounds] if names else []
        if late:
            raise FedlmError(
                f"`continual.slices`: {', '.join(late)} would arrive after the last round ({rounds}) at `rounds_per_slice` "
                f"{config.rounds_per_slice}; raise `federation.rounds` to {len(slices) * config.rounds_per_slice} or list fewer slices"
            )
    else:
        arrivals = {c: dict(a) for c, a in (config.schedule or {}).items()}
        for client, arrived in arrivals.items():
            _known_client(client, names, "continual.schedule")
            for name, round_num in arrived.items():
                if round_num > rounds:
                    raise FedlmError(
                        f"`continual.schedule.{client}.{name}` arrives at round {round_num}, after the last round; raise `federation.rounds` to {round_num}"
                    )
    windows: dict[str, tuple[int, int]] = {}
    for client, window in config.membership.items():
        _known_client(client, names, "continual.membership")
        last = window.last if window.last is not None else rounds
        if window.first > rounds:
            raise FedlmError(f"`continual.membership.{client}.first` is round {window.first}, after the last round ({rounds})")
        windows[client] = (window.first, min(last, rounds))
    stream = Stream(tuple(slices), arrivals, windows, {c: dict(sizes.get(c, {})) for c in names}, rounds, config.accumulate)
    _every_round_has_clients(stream, names, min_clients)
    return stream


def _known_client(client: str, names: Sequence[str], field: str) -> None:
    if client not in names:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise FedlmError(f"`{field}` names client {client!r}, which the partition does not have; its clients: {shown}")


def _every_round_has_clients(stream: Stream, names: Sequence[str], min_clients: int) -> None:
    """Refuse a stream with a round of fewer than ``min_clients`` present clients (such a round aggregates nothing)."""
    for round_num in range(1, stream.rounds + 1):
        present = stream.present(names, round_num)
        if len(present) < min_clients:
            who = ", ".join(present) or "none"
            raise FedlmError(
                f"round {round_num} has {len(present)} client(s) present and holding data ({who}), fewer than `federation.min_clients` "
                f"({min_clients}); change `continual.schedule` or `continual.membership` so that every round has clients"
            )
