"""Building a run's server loop as an ordered list of stages, one per concern (:func:`build_loop`).

Each stage is a small function ``(ctx, parts) -> None`` that calls its concern's own builder (``with_teacher``,
``personalize``, ``compressed_uplink``, ``build_systems``, ...) and sets or wraps its piece of :class:`LoopParts`.
The order of :data:`STAGES` is part of the behaviour: a runtime stage wraps the runtime the earlier ones made (so the
simulation is innermost and the retries outermost), and the observers run in the order the stages put them in.
A new per-round concern is one more stage here (an observer or a wrapper), never another branch in the round.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlm.core.round import RoundObserver
from fedlm.core.runtime import Runtime
from fedlm.federation.server import ServerLoop
from fedlm.loop_build import client_side, round_side
from fedlm.loop_build.parts import LoopContext, LoopParts, Stage

STAGES: tuple[Stage, ...] = (
    client_side.offsite_observers,
    client_side.aggregator,
    client_side.continual,
    client_side.simulation,  # innermost: the clients' training (when no runtime is given)
    client_side.teacher,
    client_side.personalization,
    client_side.node_connection,
    client_side.client_state_spill,
    client_side.uplink,
    client_side.replay,
    client_side.attack,
    client_side.systems,
    round_side.tasks,
    round_side.aggregation_step,
    round_side.secure_or_retries,  # outermost runtime wrapper: the retries (or SecAgg+ on the nodes)
    round_side.watermark,
    round_side.contribution,
    round_side.round_,
    round_side.continual_milestone,
    round_side.evaluation_milestones,
    round_side.checkpoint_and_budget,
    round_side.loop,
)


def build_loop(ctx: LoopContext, runtime: Runtime | None, observers: Sequence[RoundObserver], stages: Sequence[Stage] = STAGES) -> ServerLoop:
    """Apply ``stages`` in order to the parts of a loop over ``runtime`` (None: the simulation) with the caller's
    extra ``observers``, and return the loop."""
    parts = LoopParts(runtime=runtime, observers=list(observers))
    for stage in stages:
        stage(ctx, parts)
    return parts.loop


__all__ = ["STAGES", "LoopContext", "LoopParts", "Stage", "build_loop"]
