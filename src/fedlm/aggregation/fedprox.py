"""FedProx: FedAvg on the server, a proximal term on every client.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith 2020, "Federated Optimization in Heterogeneous Networks" (MLSys),
Algorithm 2 / eq. (2): client k minimises h_k(w; w^t) = F_k(w) + (mu / 2) ||w - w^t||^2, where w^t is the model
it started the round from; the server step is FedAvg. Here w ranges over the trainable (adapter) tensors. The
term's gradient mu (w - w^t) reaches the optimizer with the loss gradient (it is clipped with it by
``federation.max_grad_norm``). Flower's FedProx strategy is FedAvg on the server with ``proximal_mu`` sent to
clients in the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field

from fedlm.aggregation.base import AggregatorParams, register_aggregator
from fedlm.aggregation.fedavg import FedAvg
from fedlm.core.task import TrainerHook


def proximal_term(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """(mu / 2) * sum over tensors of ||w - w^t||^2 (differentiable in ``params``)."""
    total = sum(((p - anchor[name].to(p.dtype)) ** 2).sum() for name, p in params.items())
    return (mu / 2.0) * total  # type: ignore[return-value]


class ProximalHook(TrainerHook):
    """Adds the proximal term to every local step."""

    def __init__(self, mu: float) -> None:
        self.mu = mu

    def extra_loss(self, params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        return proximal_term(params, global_params, self.mu) if self.mu > 0 else None


@register_aggregator("fedprox")
class FedProx(FedAvg):
    """FedAvg server step; the client trainer runs :class:`ProximalHook`."""

    class Params(AggregatorParams):
        mu: float = Field(0.01, ge=0.0, allow_inf_nan=False, description="proximal coefficient mu (0 gives FedAvg)")

    params: Params

    def trainer_hooks(self) -> list[TrainerHook]:
        return [ProximalHook(self.params.mu)]
