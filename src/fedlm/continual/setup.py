"""Attaching continual learning to a simulated run (:func:`fedlm.experiment.build_server_loop`): the trainer hook of
EWC, the runtime wrapper that feeds each client its data of the round, the sampler over present clients, and the
evaluation after every stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedlm.continual.data import ContinualData
from fedlm.continual.ewc import EWCHook
from fedlm.continual.observer import StageEvaluation, slice_evaluator
from fedlm.continual.runtime import ContinualRuntime
from fedlm.continual.schedule import Stream, StreamSampler
from fedlm.core.runtime import Runtime
from fedlm.core.task import TrainerHook
from fedlm.evaluation.evaluator import Evaluator
from fedlm.personalization.store import ClientStore
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import RunDir

if TYPE_CHECKING:
    from fedlm.experiment import Session


@dataclass
class ContinualSide:
    """What a continual run adds to the simulation: hooks, the clients' current data, the store, the stream."""

    session: Session
    run_dir: RunDir
    data: ContinualData
    stream: Stream
    ewc: EWCHook | None
    current: dict[str, Sequence[Any]] = field(default_factory=dict)

    @property
    def hooks(self) -> list[TrainerHook]:
        """The trainer hooks (EWC's penalty and Fisher), none without ``ewc`` in ``continual.mitigations``."""
        return [self.ewc] if self.ewc is not None else []

    @property
    def sampler(self) -> StreamSampler:
        """Sampling over the clients present in the round."""
        return StreamSampler(self.stream)

    def runtime(self, inner: Runtime) -> ContinualRuntime:
        """``inner`` (reading the clients' examples from :attr:`current`) fed with the stream's data."""
        config = self.session.config
        cont = config.continual
        if cont is None:
            raise ValueError("a continual side needs a `continual` section")
        store = ClientStore(self.run_dir.root / "clients")
        return ContinualRuntime(inner, self.stream, self.data, self.current, store, self.run_dir.checkpoints, cont, config.seed, self.ewc)

    def observer(self, evaluator: Evaluator, log: MetricsLog, console: RunConsole) -> StageEvaluation:
        """The evaluation after every stage on each slice's test records."""
        field_name = self.session.config.continual.field if self.session.config.continual else ""
        per_slice = slice_evaluator(evaluator, lambda ex: self.data.test_slice(ex, field_name))
        return StageEvaluation(per_slice, self.stream, log, console, self.session.config.eval.at_start)


def continual_side(session: Session, run_dir: RunDir) -> ContinualSide | None:
    """The continual side of ``session`` (None without a ``continual`` section)."""
    data, cont = session.data, session.config.continual
    if cont is None or not isinstance(data, ContinualData) or data.stream is None:
        return None
    ewc = None
    if "ewc" in cont.mitigations:
        ewc = EWCHook(
            session.model, session.objective, session.loaded.tokenizer.pad_token_id, session.loaded.device, cont.ewc.strength, cont.ewc.samples
        )
    return ContinualSide(session, run_dir, data, data.stream, ewc)
