"""FedAdam: adaptive federated optimisation with an Adam server.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2, FedAdam line:
v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2, then x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau) with
m_t = beta1 m_{t-1} + (1 - beta1) Delta_t. The shared step, its state and the other differences from Flower are in
:mod:`fedlm.aggregation.fedopt`.

Bias correction, the one formula difference from ``flwr.server.strategy.FedAdam`` (flwr 1.41): Flower always
scales eta by sqrt(1 - beta2^(r+1)) / (1 - beta1^(r+1)) with r = ``server_round`` (1 at the first round), one step
ahead of Kingma & Ba 2015 (Section 2, the line before 2.1), whose t is 1 at the first step. Algorithm 2 of Reddi
et al. has no correction, and that is fedlm's default (``bias_correction: false``). With ``bias_correction: true``
fedlm uses Kingma & Ba's eta_t = eta sqrt(1 - beta2^t) / (1 - beta1^t), t = the number of server steps taken; this
equals Flower's FedAdam called with ``server_round = t - 1``. To reproduce Flower exactly, call
:func:`fedadam_step` with Flower's per-round eta (``tests/test_flower_reference.py`` does).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlm.aggregation.base import register_aggregator
from fedlm.aggregation.fedopt import AdaptiveMomentParams, FedOptAggregator, FedOptStep, fedopt_step


def fedadam_step(
    params: Mapping[str, torch.Tensor],
    mean_delta: Mapping[str, torch.Tensor],
    m: Mapping[str, torch.Tensor],
    v: Mapping[str, torch.Tensor],
    *,
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> FedOptStep:
    """One FedAdam server step: beta2 v + (1 - beta2) Delta^2; x + eta m_t / (sqrt(v_t) + tau)."""
    return fedopt_step(params, mean_delta, m, v, variant="adam", eta=eta, beta1=beta1, beta2=beta2, tau=tau)


@register_aggregator("fedadam")
class FedAdam(FedOptAggregator):
    """FedOpt with the Adam second moment."""

    variant = "adam"

    class Params(AdaptiveMomentParams):
        """FedAdam's parameters: eta 1e-2, beta1 0.9, beta2 0.99, tau 1e-3 (Reddi et al.), no bias correction."""
