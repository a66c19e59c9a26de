"""Building a run's secure aggregation from its config (the rules that refuse a bad one: :mod:`fedlm.config.rules`)."""

from __future__ import annotations

from fedlm.aggregation.base import Aggregator
from fedlm.config.schema import ExperimentConfig
from fedlm.privacy.secagg.round import SecureAggregation
from fedlm.privacy.secagg.threshold import threshold


def build_secure_aggregation(config: ExperimentConfig, aggregator: Aggregator, num_clients: int) -> SecureAggregation | None:
    """SecAgg+ for the run when ``privacy.secure_aggregation`` is set, else None.

    ``aggregator`` is the run's (possibly DP-wrapped) aggregator; the config rules have accepted it with secure
    aggregation (:func:`fedlm.config.rules.check_config`, and :func:`~fedlm.config.rules.check_federation` on the
    real ``num_clients``)."""
    sa = config.privacy.secure_aggregation
    if sa is None:
        return None
    return SecureAggregation(sa, threshold(sa, config.federation.clients_per_round or num_clients), config.seed)
