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
from typing import Protocol

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


class Dispatch(Protocol):
    """What FedBuff needs from a deployment whose clients train on real devices (a runtime's ``asynchronous``
    capability, e.g. :class:`~fedlm.runtime.flower.dispatch.FlowerDispatch`)."""

    def serving(self) -> set[str]:
        """The clients that can be started now."""
        ...

    def start(self, client: str, task: ClientTask) -> ClientFailure | None:
        """Send ``task`` to ``client``; its failure if it could not be sent."""
        ...

    def arrivals(self) -> list[ClientUpdate | ClientFailure]:
        """Block until at least one client in flight has answered; the results in arrival order."""
        ...


@dataclass
class _Flight:
    """A client's task in flight: what it started from, what it will send, when it started and finishes."""

    task: ClientTask
    version: int  # server steps done when it started
    result: ClientUpdate | ClientFailure | None  # None: on a real device, not arrived yet
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
    dispatch: Dispatch | None = None  # clients on real devices (Flower): arrivals in wall-clock order, no simulated clock

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
        if self.dispatch is not None:
            return _DeployedRun(self, state, self.dispatch).run()
        return _AsyncRun(self, state).run()

    def run_round(self, state: TensorDict, round_num: int) -> TensorDict:
        raise FedlmError("`systems.mode: fedbuff` has no single round to run: its server steps depend on the clients in flight")


class _AsyncRun:
    """The event loop of one FedBuff run: the clients in flight, the buffer, the idle clients."""

    seconds_key = "client_sim_seconds"  # a client's time from start to arrival, in each update's metrics

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
        if flight.result is None:
            raise RuntimeError(f"FedBuff: client {client} arrived without a result")
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

    def task(self, client: str) -> ClientTask:
        """``client``'s task from the current global model, its local seed drawn from the dispatch number."""
        round_ = self.loop.round
        task = round_.tasks.build(self.state, [client], self.version + 1)[client]
        return dataclasses.replace(task, plan=dataclasses.replace(task.plan, seed=derive_seed(round_.seed, "fedbuff-local", self.dispatches, client)))

    def dispatch(self, client: str, now: float) -> None:
        """Start ``client`` from the current global model; its result is computed now and arrives when it finishes."""
        task = self.task(client)
        (result,) = self.loop.round.runtime.train_clients({client: task})
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
            metrics = {**update.metrics, "staleness": float(staleness), "staleness_weight": weights[client], self.seconds_key: flight.seconds}
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
        record.fields.update(self.clock_fields())
        for observer in [*loop.round.observers, *loop.milestones]:
            observer.on_round(record)
        self.state, self.version, self.last_wall = outcome.state, round_num, wall
        self.idle.extend(chosen)
        self.buffer, self.failures = [], []

    def clock_fields(self) -> dict[str, float]:
        """The step's time fields in ``metrics.jsonl``."""
        return {"sim_seconds": self.loop.clock.now, "wall_seconds": self.loop.clock.wall_seconds(), "in_flight": len(self.flights)}


class _DeployedRun(_AsyncRun):
    """FedBuff with the clients on real devices: a dispatch sends the task, arrivals come in wall-clock order (not
    deterministic: which update lands in which buffer depends on the devices' speed)."""

    seconds_key = "client_wall_seconds"
    wait_for_clients_s = 120.0  # nothing in flight and no client to start: how long to wait for one to connect

    def __init__(self, loop: FedBuffLoop, state: TensorDict, dispatcher: Dispatch) -> None:
        super().__init__(loop, state)
        self.dispatcher = dispatcher

    def run(self) -> TensorDict:
        waited_since: float | None = None
        while self.version < self.loop.rounds:
            self.fill()
            if not self.flights:
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since > self.wait_for_clients_s:
                    raise FedlmError(f"FedBuff: no client could be started for {self.wait_for_clients_s:g}s (no SuperNode serves an idle client)")
                time.sleep(1.0)
                continue
            waited_since = None
            for result in self.dispatcher.arrivals():
                flight = self.flights.get(result.client_id)
                if flight is None or self.version >= self.loop.rounds:
                    continue
                flight.result, flight.seconds = result, time.perf_counter() - flight.started
                self.arrive(result.client_id)
                if self.version < self.loop.rounds:
                    self.fill()  # a free slot is taken at once, as in the paper (and the simulation)
        return self.state

    def fill(self) -> None:
        """Start idle clients that a device serves until ``concurrency`` are in flight (seeded choice)."""
        serving = self.dispatcher.serving() if len(self.flights) < self.loop.settings.concurrency else set()
        while len(self.flights) < self.loop.settings.concurrency:
            ready = sorted(c for c in self.idle if c in serving)
            if not ready:
                return
            client = random.Random(derive_seed(self.loop.round.seed, "fedbuff-pick", self.dispatches)).choice(ready)
            self.dispatch(client, 0.0)
            serving.discard(client)

    def dispatch(self, client: str, now: float) -> None:
        """Send ``client`` its task; a client that cannot be reached is a failure of the next step, not started."""
        task = self.task(client)
        failure = self.dispatcher.start(client, task)
        self.dispatches += 1
        if failure is not None:
            self.failures.append(failure)
            return
        self.flights[client] = _Flight(task, self.version, None, time.perf_counter(), 0.0)
        self.idle.remove(client)

    def clock_fields(self) -> dict[str, float]:
        return {"wall_seconds": self.loop.clock.wall_seconds(), "in_flight": len(self.flights)}
