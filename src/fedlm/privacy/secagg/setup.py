"""Building a run's secure aggregation from its config (checked again on the real federation size)."""

from __future__ import annotations

from fedlm.aggregation.base import Aggregator
from fedlm.config.schema import ExperimentConfig
from fedlm.privacy.secagg.checks import check_secure_aggregation, threshold
from fedlm.privacy.secagg.round import SecureAggregation


def build_secure_aggregation(config: ExperimentConfig, aggregator: Aggregator, num_clients: int) -> SecureAggregation | None:
    """SecAgg+ for the run when ``privacy.secure_aggregation`` is set, else None."""
    sa = config.privacy.secure_aggregation
    if sa is None:
        return None
    inner = getattr(aggregator, "inner", aggregator)  # the DP wrapper delegates; check the aggregator it wraps
    check_secure_aggregation(config, inner, num_clients)
    return SecureAggregation(sa, threshold(config, config.federation.clients_per_round or num_clients), config.seed)
