"""Building the ``systems`` section into a run: the device profiles, the availability, the simulated clock, the
deadline wrapper around the runtime, and the server loop (synchronous rounds on the clock, or FedBuff)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from fedlm.config.schema import ExperimentConfig
from fedlm.core.round import RoundObserver
from fedlm.core.runtime import Runtime
from fedlm.federation.server import ServerLoop
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.systems.clock import AvailableRound, ClockObserver, SimClock
from fedlm.systems.deadline import DeadlineRuntime
from fedlm.systems.fedbuff import Dispatch, FedBuffLoop, FedBuffSettings
from fedlm.systems.profiles import Availability, DeviceProfile, build_availability, build_profiles


@dataclass
class SystemsSetup:
    """The run's devices and clock, and how they change its runtime, observers and server loop."""

    config: ExperimentConfig
    profiles: dict[str, DeviceProfile]
    availability: Availability
    clock: SimClock
    log: MetricsLog
    dispatch: Dispatch | None = None  # clients on real devices (a Flower deployment): FedBuff sends and waits for real

    def runtime(self, runtime: Runtime) -> Runtime:
        """``runtime`` cut to the round deadline (``federation.round_deadline_s``), or as it is."""
        deadline, systems = self.config.federation.round_deadline_s, self.config.systems
        if deadline is None or systems is None:
            return runtime
        return DeadlineRuntime(runtime, self.profiles, deadline, systems.late_clients == "partial", systems.partial_normalisation == "fednova")

    def observers(self) -> list[RoundObserver]:
        """The clock observer of synchronous rounds (FedBuff's loop keeps the clock itself)."""
        if self.fedbuff:
            return []
        return [ClockObserver(self.profiles, self.clock, self.config.federation.round_deadline_s, self.log)]

    @property
    def fedbuff(self) -> bool:
        return self.config.systems is not None and self.config.systems.mode == "fedbuff"

    def server_loop(self, loop: ServerLoop) -> ServerLoop:
        """``loop`` on the clock: its rounds sample the online clients, or FedBuff's asynchronous loop on its parts."""
        systems, fed = self.config.systems, self.config.federation
        if systems is None or not self.fedbuff:
            return dataclasses.replace(loop, round=AvailableRound.around(loop.round, self.availability, self.clock))
        buff = systems.fedbuff
        concurrency = min(buff.concurrency or fed.clients_per_round or len(self.profiles), len(self.profiles))
        settings = FedBuffSettings(buff.buffer_size, concurrency, buff.staleness_exponent, buff.max_staleness)
        return FedBuffLoop(loop.round, loop.rounds, loop.milestones, self.profiles, settings, self.availability, self.clock, self.dispatch)


def build_systems(config: ExperimentConfig, client_names: Sequence[str], log: MetricsLog, dispatch: Dispatch | None = None) -> SystemsSetup | None:
    """The run's :class:`SystemsSetup`, or None without a ``systems`` section; ``dispatch``: the clients train on
    real devices (only FedBuff runs there; the config rules refuse the simulated devices and clock)."""
    if config.systems is None:
        return None
    profiles = build_profiles(config.systems, client_names, config.seed)
    availability = build_availability(config.systems, client_names, config.seed)
    return SystemsSetup(config, profiles, availability, SimClock(), log, dispatch)
