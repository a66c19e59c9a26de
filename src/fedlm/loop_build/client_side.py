"""The stages of :mod:`fedlm.loop_build` that make the round's runtime: the clients' training and every wrapper
around it, innermost first (the order is the nesting: a later stage wraps the earlier ones' runtime)."""

from __future__ import annotations

from fedlm.attacks.harness import AttackedRuntime
from fedlm.compression.setup import compressed_uplink, round_aggregator, seed_replay, seed_trainer
from fedlm.continual.setup import continual_side
from fedlm.core.errors import FedlmError
from fedlm.federation.observers.client_state import spill_client_states
from fedlm.loop_build.parts import LoopContext, LoopParts
from fedlm.personalization.setup import personalize
from fedlm.runtime.simulation import SimulationRuntime
from fedlm.systems.setup import build_systems
from fedlm.teacher.runtime import with_teacher


def offsite_observers(ctx: LoopContext, parts: LoopParts) -> None:
    """Offsite-tuning: the emulator's traffic, the plug-in check, FedBiOT's alignment, before the caller's observers."""
    if ctx.session.offsite is not None:
        parts.observers = [*ctx.session.offsite.observers(ctx.log), *parts.observers]


def aggregator(ctx: LoopContext, parts: LoopParts) -> None:
    """The aggregator the round runs on (the checkpoints save ``ctx.saved``, with the compression's state too)."""
    parts.aggregator = round_aggregator(ctx.saved)
    parts.aggregator.start(ctx.names)


def continual(ctx: LoopContext, parts: LoopParts) -> None:
    """``continual``: the stream's data per round (simulation only)."""
    parts.continual = continual_side(ctx.session, ctx.run_dir) if ctx.clients_here else None


def simulation(ctx: LoopContext, parts: LoopParts) -> None:
    """The in-process clients (when the caller gave no runtime): the trainer with the aggregator's and the stream's
    hooks, data-parallel on ``ctx.processes``, zeroth-order under fedkseed; the continual stream around it."""
    if not ctx.clients_here:
        return
    session, side = ctx.session, parts.continual
    trainer = session.trainer([*parts.aggregator.trainer_hooks(), *(side.hooks if side else [])])
    trainer = ctx.processes.trainer(trainer) if ctx.processes is not None else trainer
    client_train = side.current if side else session.data.client_train
    parts.runtime = SimulationRuntime(seed_trainer(trainer, session.config), client_train, ctx.progress)
    if side is not None:
        streamed = side.runtime(parts.runtime)
        parts.runtime, parts.observers = streamed, [streamed, *parts.observers]


def teacher(ctx: LoopContext, parts: LoopParts) -> None:
    """``teacher.mode``: the clients' data taught by a black-box teacher (simulation only)."""
    if ctx.clients_here:
        parts.runtime = with_teacher(parts.built_runtime, ctx.session, ctx.run_dir)


def personalization(ctx: LoopContext, parts: LoopParts) -> None:
    """``personalization.method``: client-side, inside every later wrapper; on Flower SuperNodes the method runs on
    the nodes and the runtime's observer keeps their stores in step with the run (capability ``node_personalization``)."""
    if not ctx.clients_here:
        on_nodes = getattr(parts.built_runtime, "node_personalization", None)
        if ctx.session.config.personalization.method is not None and callable(on_nodes):
            parts.observers = [on_nodes(ctx.run_dir.checkpoints), *parts.observers]
        return
    personal = personalize(ctx.session, parts.built_runtime, ctx.run_dir)
    if personal is not None:
        parts.runtime, parts.observers = personal, [personal, *parts.observers]


def node_connection(ctx: LoopContext, parts: LoopParts) -> None:
    """A deployment connects to its nodes before round 1 (capability ``connection``), after the observers placed so
    far have started (personalization's start round travels in the handshake)."""
    connect = None if ctx.clients_here else getattr(parts.built_runtime, "connection", None)
    if callable(connect):
        parts.observers = [*parts.observers, connect()]


def client_state_spill(ctx: LoopContext, parts: LoopParts) -> None:
    """The clients' own state (SCAFFOLD's c_i, error-feedback residuals) on disk between rounds (simulation only)."""
    spill = spill_client_states(ctx.saved, ctx.run_dir.root / "clients", ctx.run_dir.checkpoints) if ctx.clients_here else None
    if spill is not None:
        parts.observers = [spill, *parts.observers]


def uplink(ctx: LoopContext, parts: LoopParts) -> None:
    """``compression.uplink``: encoded on the clients, decoded here; it also logs the encoded upload sizes."""
    found = compressed_uplink(parts.built_runtime, ctx.session.config, ctx.saved, ctx.clients_here)
    if found is not None:
        parts.runtime, parts.observers = found, [found, *parts.observers]


def replay(ctx: LoopContext, parts: LoopParts) -> None:
    """``federation.algorithm: fedkseed``: the clients' (seed, scalar) pairs replayed here."""
    parts.replay = seed_replay(parts.built_runtime, ctx.session.config)
    if parts.replay is not None:
        parts.runtime, parts.observers = parts.replay, [parts.replay, *parts.observers]


def attack(ctx: LoopContext, parts: LoopParts) -> None:
    """``attack``: the attackers' updates altered after training (attacks that need the runtime)."""
    plan = ctx.session.attack
    if plan is not None and plan.needs_runtime():
        parts.runtime = AttackedRuntime(parts.built_runtime, plan)


def systems(ctx: LoopContext, parts: LoopParts) -> None:
    """``systems``: device profiles, the simulated clock, deadlines, FedBuff; its observers after the others. On a
    deployment FedBuff sends and waits for real devices (the runtime's ``asynchronous`` capability)."""
    dispatch = None
    if not ctx.clients_here and ctx.session.config.systems is not None:
        capability = getattr(parts.built_runtime, "asynchronous", None)
        if not callable(capability):
            raise FedlmError(
                f"`systems.mode: fedbuff` needs a runtime that sends one client's task at a time; {type(parts.built_runtime).__name__} does not"
            )
        dispatch = capability()
    parts.systems = build_systems(ctx.session.config, ctx.names, ctx.log, dispatch)
    if parts.systems is not None:
        parts.runtime, parts.observers = parts.systems.runtime(parts.built_runtime), [*parts.observers, *parts.systems.observers()]
