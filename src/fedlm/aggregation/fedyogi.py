"""FedYogi: adaptive federated optimisation with a Yogi server.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2, FedYogi line:
v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2) (the Yogi update of Zaheer et al. 2018), then
x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau) with m_t = beta1 m_{t-1} + (1 - beta1) Delta_t. Unlike Adam's, this v_t
grows or shrinks by at most (1 - beta2) Delta_t^2 per round. ``flwr.server.strategy.FedYogi`` (flwr 1.41) has the
same formula and no bias correction; the shared step, its state and the other differences from Flower are in
:mod:`fedlm.aggregation.fedopt`.
"""

from __future__ import annotations

from fedlm.aggregation.base import register_aggregator
from fedlm.aggregation.fedopt import AdaptiveMomentParams, FedOptAggregator


@register_aggregator("fedyogi")
class FedYogi(FedOptAggregator):
    """FedOpt with the Yogi second moment."""

    variant = "yogi"

    class Params(AdaptiveMomentParams):
        """FedYogi's parameters: eta 1e-2, beta1 0.9, beta2 0.99, tau 1e-3 (Reddi et al.), no bias correction."""
