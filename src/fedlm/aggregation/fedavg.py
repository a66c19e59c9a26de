"""FedAvg: the example-weighted average of client models.

McMahan, Moore, Ramage, Hampson & Aguera y Arcas 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", Algorithm 1: w_{t+1} = sum_k (n_k / n) w^k_{t+1}. With client deltas
Delta_k = w^k_{t+1} - w_t this is w_{t+1} = w_t + sum_k p_k Delta_k, p_k = n_k / n.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlm.aggregation.base import AggregationResult, Aggregator, register_aggregator
from fedlm.aggregation.weights import example_weights, weighted_sum
from fedlm.core.update import ClientUpdate, TensorDict


def fedavg_step(params: Mapping[str, torch.Tensor], deltas: Sequence[Mapping[str, torch.Tensor]], num_examples: Sequence[int]) -> TensorDict:
    """w + sum_k p_k Delta_k, p_k = n_k / sum n (float32 accumulation, result in each tensor's dtype)."""
    mean_delta = weighted_sum(deltas, example_weights(num_examples))
    return {name: (params[name].to(torch.float32) + mean_delta[name]).to(params[name].dtype) for name in params}


@register_aggregator("fedavg")
class FedAvg(Aggregator):
    """Example-weighted averaging; stateless."""

    example_weighted_mean = True

    def aggregate(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> AggregationResult:
        new = fedavg_step(global_params, [u.tensors for u in updates], [u.num_examples for u in updates])
        return AggregationResult(params=new, metrics={"num_updates": float(len(updates))})
