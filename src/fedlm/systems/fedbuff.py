"""FedBuff: asynchronous buffered aggregation (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
Aggregation", Algorithm 1), on the simulated clock.

Up to ``concurrency`` clients train at once, each from the global model current when it starts. Arrivals are
taken in order of simulated finish time; every ``buffer_size`` arrivals the server steps with the configured
aggregation (FedAvg: x <- x + sum_i n_i s(tau_i) Delta_i / sum_i n_i, the paper's (1/K) sum_i s(tau_i) Delta_i for
equal client sizes), where tau_i, the staleness, counts the server steps since client i started and
s(tau) = (1 + tau)^-a (a = 0.5: 1/sqrt(1 + tau), the paper's choice). A client whose update waits in the buffer is
not started again before that step, so a step holds at most one update per client. Each server step is one
``round`` of ``metrics.jsonl`` and of the observers (traffic, evaluation, checkpoints).

Deterministic: the events are ordered by (simulated time, dispatch order) and every choice is drawn from the seed,
so the same seed gives the same adapter whatever the wall-clock speed of the machine.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedlm.aggregation.lora_structure import wire_form
from fedlm.core.errors import FedlmError
from fedlm.core.round import RoundRecord
from fedlm.core.seeding import derive_seed
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate, TensorDict
from fedlm.federation.server import ServerLoop
from fedlm.federation.wire import serialized_bytes
from fedlm.systems.clock import SimClock, client_seconds
from fedlm.systems.profiles import AlwaysOnline, Availability, DeviceProfile


def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """FedBuff's staleness weight s(tau) = (1 + tau)^-exponent (Nguyen et al. 2022, Sec. 3; 0.5: 1/sqrt(1+tau))."""
    return float((1.0 + staleness) ** -exponent)


@dataclass(frozen=True)
class FedBuffSettings:
    """``systems.fedbuff``, with the concurrency resolved."""

    buffer_size: int
    concurrency: int
    staleness_exponent: float = 0.5
    max_staleness: int | None = None


@dataclass
class _Flight:
    """A client's task in flight: what it started from, what it will send, when it started and finishes."""

    task: ClientTask
    version: int  # server steps done when it started
    result: ClientUpdate | ClientFailure
    started: float
    seconds: float


@dataclass
class FedBuffLoop(ServerLoop):
    """The asynchronous server loop: ``rounds`` server steps of FedBuff, each handed to the round's observers and
    the milestones like a synchronous round. Uses the round's task builder, runtime, validator and aggregation."""

    profiles: Mapping[str, DeviceProfile] = field(default_factory=dict)
    settings: FedBuffSettings = field(default_factory=lambda: FedBuffSettings(1, 1))
    availability: Availability = field(default_factory=AlwaysOnline)
    clock: SimClock = field(default_factory=SimClock)

    def run(self, state: TensorDict, start_round: int) -> TensorDict:
        """``rounds`` server steps from ``state``; refuses to resume (clients in flight are not checkpointed)."""
        if start_round > 0:
            raise FedlmError(
                "`systems.mode: fedbuff` cannot be resumed: the clients in flight are not in the checkpoint; start a new run "
                "(the checkpoints' adapters can seed it through `model.init_adapter`)"
            )
        for observer in [*self.round.observers, *self.milestones]:
            observer.on_start(state, start_round)
        self.clock.wall_started = time.perf_counter()
        return _AsyncRun(self, state).run()

    def run_round(self, state: TensorDict, round_num: int) -> TensorDict:
        raise FedlmError("`systems.mode: fedbuff` has no single round to run: its server steps depend on the clients in flight")


class _AsyncRun:
    """The event loop of one FedBuff run: the clients in flight, the buffer, the idle clients."""

    def __init__(self, loop: FedBuffLoop, state: TensorDict) -> None:
        self.loop, self.state, self.version = loop, state, 0
        self.events: list[tuple[float, int, str]] = []  # (finish time, dispatch number, client; "" wakes the loop)
        self.flights: dict[str, _Flight] = {}
        self.buffer: list[tuple[str, _Flight, ClientUpdate]] = []
        self.failures: list[ClientFailure] = []
        self.idle = list(loop.round.client_names)
        self.dispatches = 0
        self.last_wall = time.perf_counter()

    def run(self) -> TensorDict:
        self.fill()
        while self.version < self.loop.rounds:
            if not self.events:
                raise FedlmError(f"FedBuff: no client is in flight or will come online after simulated second {self.loop.clock.now:g}")
            now, _, client = heapq.heappop(self.events)
            self.loop.clock.now = now
            if client:
                self.arrive(client)
            self.fill()
        return self.state

    def arrive(self, client: str) -> None:
        """``client``'s result reaches the server; a full buffer makes a server step."""
        flight = self.flights.pop(client)
        if isinstance(flight.result, ClientFailure):
            self.failures.append(flight.result)
            self.idle.append(client)
            if len(self.failures) > 10 * len(self.loop.round.client_names):  # every restart fails: stop, do not spin
                raise FedlmError(f"FedBuff: {len(self.failures)} failed clients since the last server step; first: {self.failures[0].reason}")
            return
        self.buffer.append((client, flight, flight.result))
        if len(self.buffer) >= self.loop.settings.buffer_size:
            self.step()

    def fill(self) -> None:
        """Start idle online clients until ``concurrency`` are in flight; wake up when an idle client comes online."""
        while len(self.flights) < self.loop.settings.concurrency and self.idle:
            now = self.loop.clock.now
            online = sorted(c for c in self.idle if self.loop.availability.online(c, now))
            if not online:
                wake = self.loop.availability.next_online(sorted(self.idle), now)
                if wake is not None and not any(t == wake and not c for t, _, c in self.events):
                    heapq.heappush(self.events, (wake, self.dispatches, ""))
                return
            client = random.Random(derive_seed(self.loop.round.seed, "fedbuff-pick", self.dispatches)).choice(online)
            self.dispatch(client, now)

    def dispatch(self, client: str, now: float) -> None:
        """Start ``client`` from the current global model; its result is computed now and arrives when it finishes."""
        round_ = self.loop.round
        task = round_.tasks.build(self.state, [client], self.version + 1)[client]
        task = dataclasses.replace(task, plan=dataclasses.replace(task.plan, seed=derive_seed(round_.seed, "fedbuff-local", self.dispatches, client)))
        (result,) = round_.runtime.train_clients({client: task})
        rank = task.plan.rank
        down = serialized_bytes(wire_form(task.state, rank), wire_form(task.context.extras, rank))
        up = serialized_bytes(wire_form(result.tensors, rank), wire_form(result.extras, rank)) if isinstance(result, ClientUpdate) else 0
        steps = result.metrics.get("steps", len(task.plan.lrs)) if isinstance(result, ClientUpdate) else len(task.plan.lrs)
        seconds = client_seconds(self.loop.profiles[client], steps, down, up)
        self.flights[client] = _Flight(task, self.version, result, now, seconds)
        self.idle.remove(client)
        heapq.heappush(self.events, (now + seconds, self.dispatches, client))
        self.dispatches += 1

    def step(self) -> None:
        """One server step on the buffer: staleness-weighted updates through the round's validator and aggregation."""
        loop, round_num, settings = self.loop, self.version + 1, self.loop.settings
        tasks: dict[str, ClientTask] = {}
        results: list[ClientUpdate | ClientFailure] = []
        weights: dict[str, float] = {}
        for client, flight, update in self.buffer:
            staleness = self.version - flight.version
            tasks[client] = flight.task
            if settings.max_staleness is not None and staleness > settings.max_staleness:
                results.append(ClientFailure(client, round_num, f"too stale: {staleness} server steps > max_staleness {settings.max_staleness}"))
                continue
            weights[client] = staleness_weight(staleness, settings.staleness_exponent)
            metrics = {**update.metrics, "staleness": float(staleness), "staleness_weight": weights[client], "client_sim_seconds": flight.seconds}
            tensors = {name: t * weights[client] for name, t in update.tensors.items()}
            results.append(dataclasses.replace(update, round=round_num, tensors=tensors, metrics=metrics))
        chosen = [client for client, _, _ in self.buffer]
        accepted, rejected = loop.round.validator.split(results, self.state, chosen, round_num)
        outcome = loop.round.aggregation.aggregate(self.state, tasks, accepted, round_num)
        received = [r for r in results if isinstance(r, ClientUpdate)]
        failures = [*self.failures, *rejected]
        wall = time.perf_counter()
        record = RoundRecord(
            round_num, chosen, tasks, received, accepted, failures, self.state, outcome.state, outcome.skipped,
            {**outcome.metrics, "staleness": {c: self.version - f.version for c, f, _ in self.buffer}}, wall - self.last_wall, outcome.protocol_bytes,
        )  # fmt: skip
        record.fields.update(sim_seconds=loop.clock.now, wall_seconds=loop.clock.wall_seconds(), in_flight=len(self.flights))
        for observer in [*loop.round.observers, *loop.milestones]:
            observer.on_round(record)
        self.state, self.version, self.last_wall = outcome.state, round_num, wall
        self.idle.extend(chosen)
        self.buffer, self.failures = [], []
