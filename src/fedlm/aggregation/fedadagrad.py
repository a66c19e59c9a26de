"""FedAdagrad: adaptive federated optimisation with an Adagrad server.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2, FedAdagrad line:
v_t = v_{t-1} + Delta_t^2, then x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau) with m_t = beta1 m_{t-1} + (1 - beta1)
Delta_t. The shared step, its state and the differences from Flower are in :mod:`fedlm.aggregation.fedopt`.

Adagrad has no second-moment decay, so ``beta2`` and ``bias_correction`` are not parameters. ``beta1`` defaults to
0.0 as in Flower's FedAdagrad (which fixes it at 0; m_t is then Delta_t).
"""

from __future__ import annotations

from pydantic import Field

from fedlm.aggregation.base import register_aggregator
from fedlm.aggregation.fedopt import FedOptAggregator, FedOptParams


@register_aggregator("fedadagrad")
class FedAdagrad(FedOptAggregator):
    """FedOpt with the Adagrad accumulator."""

    variant = "adagrad"

    class Params(FedOptParams):
        """FedAdagrad's parameters: eta 1e-2, beta1 0.0 (as Flower), tau 1e-3 (Reddi et al.), v_{-1} 0."""

        beta1: float = Field(0.0, ge=0, lt=1, description="first-moment decay beta1, in [0, 1); 0 as Flower")
