"""The simulated clock: how long a client's work takes on its device, how long a synchronous round lasts, and the
round observer that advances the clock and logs ``sim_seconds`` beside ``wall_seconds``.

A client's time is download / downlink + steps / speed + upload / uplink, with the bytes measured as they travel
(:class:`fedlm.federation.observers.traffic.TrafficMeter`, replaced by the encoded sizes under compression). A
synchronous round lasts as long as its slowest participant, or the whole deadline when a client was dropped for
missing it (the server waits for it until then). The server's own time (aggregation, evaluation) is not simulated.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from fedlm.core.errors import FedlmError
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.update import TensorDict
from fedlm.federation.server import Round
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.systems.profiles import Availability, DeviceProfile

#: The start of the failure reason of a client dropped for missing the round's deadline.
DEADLINE_REASON = "missed the round deadline"


def transfer_seconds(num_bytes: float, mbps: float) -> float:
    """Seconds to move ``num_bytes`` at ``mbps`` Mbit/s."""
    return num_bytes * 8.0 / (mbps * 1e6)


def client_seconds(profile: DeviceProfile, steps: float, download_bytes: float, upload_bytes: float) -> float:
    """A client's simulated time for one task: download, ``steps`` local steps, upload."""
    return transfer_seconds(download_bytes, profile.downlink_mbps) + steps / profile.steps_per_s + transfer_seconds(upload_bytes, profile.uplink_mbps)


def round_seconds(durations: Mapping[str, float], deadline_s: float | None, dropped: bool) -> float:
    """A synchronous round's simulated length: its slowest participant's time, or the deadline when a client was
    dropped for missing it."""
    longest = max(durations.values(), default=0.0)
    return max(longest, deadline_s) if dropped and deadline_s is not None else longest


@dataclass
class SimClock:
    """Simulated seconds since the run started, shared by the round (availability) and the clock observer."""

    now: float = 0.0
    wall_started: float = field(default_factory=time.perf_counter)
    wall_offset: float = 0.0  # wall seconds of the rounds before a resumption

    def wall_seconds(self) -> float:
        """Wall seconds of this run (resumed runs continue their count)."""
        return self.wall_offset + time.perf_counter() - self.wall_started

    def restore(self, log: MetricsLog, round_num: int) -> None:
        """Continue from the clock logged for round ``round_num`` (a resumed run)."""
        for record in log.read():
            if record.get("split") == "aggregate" and record.get("round") == round_num and "sim_seconds" in record:
                self.now, self.wall_offset = float(record["sim_seconds"]), float(record.get("wall_seconds", 0.0))
        self.wall_started = time.perf_counter()


@dataclass
class ClockObserver(RoundObserver):
    """Advances the clock by each synchronous round's simulated length; writes ``client_sim_seconds`` into each
    client's traffic row (logged with its train record) and ``sim_seconds`` (the clock at the round's end),
    ``sim_round_seconds`` and ``wall_seconds`` into the round's aggregate record. Runs after the traffic observers."""

    profiles: Mapping[str, DeviceProfile]
    clock: SimClock
    deadline_s: float | None
    log: MetricsLog

    def on_start(self, state: TensorDict, start_round: int) -> None:
        self.clock.wall_started = time.perf_counter()
        if start_round > 0:
            self.clock.restore(self.log, start_round)

    def on_round(self, record: RoundRecord) -> None:
        durations: dict[str, float] = {}
        for update in record.received:
            row = record.traffic.get(update.client_id, {})
            steps = update.metrics.get("steps", len(record.tasks[update.client_id].plan.lrs))
            seconds = client_seconds(self.profiles[update.client_id], steps, row.get("download_bytes", 0), row.get("upload_bytes", 0))
            durations[update.client_id] = seconds
            if update.client_id in record.traffic:
                record.traffic[update.client_id]["client_sim_seconds"] = seconds
        dropped = any(f.reason.startswith(DEADLINE_REASON) for f in record.failures)
        length = round_seconds(durations, self.deadline_s, dropped)
        self.clock.now += length
        record.fields.update(sim_seconds=self.clock.now, sim_round_seconds=length, wall_seconds=self.clock.wall_seconds())


def online_clients(availability: Availability, clock: SimClock, client_names: Sequence[str]) -> list[str]:
    """The clients online at the clock's time, waiting (advancing the clock) until one is; FedlmError if none ever is."""
    start = availability.next_online(client_names, clock.now)
    if start is None:
        raise FedlmError(f"no client is online at or after simulated second {clock.now:g}: check `systems.availability`")
    clock.now = start
    return [c for c in client_names if availability.online(c, start)]


@dataclass
class AvailableRound(Round):
    """A synchronous round that samples only the clients online when it starts (all of them when fewer than
    ``clients_per_round`` are), on the simulated clock."""

    availability: Availability | None = None
    clock: SimClock = field(default_factory=SimClock)

    @classmethod
    def around(cls, round_: Round, availability: Availability, clock: SimClock) -> AvailableRound:
        """``round_`` with the same parts, sampling from the online clients."""
        return cls(**{f.name: getattr(round_, f.name) for f in fields(Round)}, availability=availability, clock=clock)

    def run(self, state: TensorDict, round_num: int) -> RoundRecord:
        if self.availability is None:
            return super().run(state, round_num)
        online = online_clients(self.availability, self.clock, self.client_names)
        per_round = None if self.clients_per_round is None else min(self.clients_per_round, len(online))
        plain = Round(online, per_round, self.seed, self.tasks, self.runtime, self.validator, self.aggregation, self.observers)
        return plain.run(state, round_num)
