"""Building a run's contribution scores and contribution sampling from its config (refusals: the rules of
:mod:`fedlm.config.rules.contribution`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedlm.aggregation.base import Aggregator
from fedlm.aggregation.lora.mode import LoraMode
from fedlm.contribution.gtg import GtgSettings
from fedlm.contribution.observer import ContributionObserver
from fedlm.contribution.sampling import ContributionSampler
from fedlm.contribution.validation import ValidationLoss, validation_examples
from fedlm.core.sampling import ClientSampler, sample_clients
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole

if TYPE_CHECKING:
    from fedlm.experiment import Session


def contribution_observer(
    session: Session, aggregator: Aggregator, lora: LoraMode, client_ranks: Mapping[str, int | None], log: MetricsLog, console: RunConsole
) -> ContributionObserver | None:
    """The observer that scores every round (``contribution.methods``), or None when scores are off."""
    config = session.config
    section = config.contribution
    if not section.enabled:
        return None
    examples = validation_examples(config, session.loaded.tokenizer, session.objective)
    pad_id = int(session.loaded.tokenizer.pad_token_id)
    loss = ValidationLoss(session.model, examples, session.objective, pad_id, session.loaded.device, section.batch_size)
    gtg = GtgSettings(**section.gtg.model_dump())
    console.print(f"contribution scores ({', '.join(section.methods)}) on {len(examples)} validation examples")
    return ContributionObserver(session.data.client_names, section.methods, aggregator, lora, client_ranks, loss, gtg, config.seed, log, console)


def client_sampler(session: Session, observer: ContributionObserver | None) -> ClientSampler:
    """How rounds pick their clients: uniformly, or by contribution (``federation.sampling``)."""
    if session.config.federation.sampling != "contribution" or observer is None:
        return sample_clients
    section = session.config.contribution
    return ContributionSampler(observer.scores_for_sampling, section.temperature, section.floor)
