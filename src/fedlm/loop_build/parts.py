"""The pieces of a server loop while it is being built (:mod:`fedlm.loop_build`): what the caller gives
(:class:`LoopContext`, fixed) and what the stages build in turn (:class:`LoopParts`, each stage reads the earlier ones'
pieces and sets or wraps its own)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedlm.aggregation.base import Aggregator
from fedlm.aggregation.lora.mode import LoraMode
from fedlm.compression.seed_training import SeedReplay
from fedlm.continual.setup import ContinualSide
from fedlm.contribution.observer import ContributionObserver
from fedlm.core.round import RoundObserver
from fedlm.core.runtime import Runtime
from fedlm.federation.aggregation_step import AggregationStep
from fedlm.federation.data_parallel import ClientProcesses
from fedlm.federation.server import Aggregation, Round, ServerLoop
from fedlm.federation.tasks import TaskBuilder
from fedlm.federation.validation import RoundValidator
from fedlm.privacy.secagg.round import SecureAggregation
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import Progress, RunConsole
from fedlm.reporting.run_dir import RunDir
from fedlm.systems.setup import SystemsSetup

if TYPE_CHECKING:
    from fedlm.experiment import Session


@dataclass(frozen=True)
class LoopContext:
    """What :func:`fedlm.experiment.build_server_loop` was given: the session, where the run writes, how it reports."""

    session: Session
    saved: Aggregator  # the run's aggregator as the checkpoints save it (with the compression's state)
    run_dir: RunDir
    log: MetricsLog
    console: RunConsole
    progress: Progress | None
    evaluate: bool
    processes: ClientProcesses | None
    clients_here: bool  # the clients train in this process (the simulation), not on Flower SuperNodes

    @property
    def names(self) -> list[str]:
        """The run's clients."""
        return self.session.data.client_names


@dataclass
class LoopParts:
    """The loop under construction. The fields without a default are set by the stage that owns them (reading one
    before its stage ran is an AttributeError, not a silent None)."""

    runtime: Runtime | None  # None until the simulation stage builds it (a Flower run passes its own)
    observers: list[RoundObserver]  # the round's extra observers, in the order they run
    aggregator: Aggregator = field(init=False)  # the one the round runs on
    continual: ContinualSide | None = None
    replay: SeedReplay | None = None
    systems: SystemsSetup | None = None
    lora: LoraMode = field(init=False)
    ranks: Mapping[str, int | None] = field(init=False)
    tasks: TaskBuilder = field(init=False)
    step: AggregationStep = field(init=False)
    secure: SecureAggregation | None = None
    aggregation: Aggregation = field(init=False)
    validator: RoundValidator = field(init=False)
    contribution: ContributionObserver | None = None
    round: Round = field(init=False)
    milestones: list[RoundObserver] = field(default_factory=list)
    loop: ServerLoop = field(init=False)

    @property
    def built_runtime(self) -> Runtime:
        """The runtime, once the simulation stage (or the caller) has given one."""
        if self.runtime is None:
            raise RuntimeError("a loop stage needs the runtime before the simulation stage built it")
        return self.runtime


Stage = Callable[[LoopContext, LoopParts], None]
"""One step of the build: reads ``ctx`` and the parts built so far, sets or wraps its own."""
