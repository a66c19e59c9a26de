"""FedAvgM: federated averaging with server momentum.

Hsu, Qi & Brown 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification" (arXiv:1909.06335), the FedAvgM update rule: the server treats the averaged client update as a
gradient step and accumulates it in a momentum buffer, v <- beta v + Delta w; w <- w - v (their Delta w is the
pseudo-gradient w - mean local model). With fedlm's deltas (Delta = local - global, the sign flipped) and a server
learning rate eta (the torch.optim.SGD convention, as Flower's FedAvgM):

    Delta_t = sum_k p_k Delta_k,  p_k = n_k / n                  (example-weighted mean delta)
    v_t     = mu v_{t-1} + Delta_t,  v_0 = 0
    w_{t+1} = w_t + eta v_t                                     (classical momentum)
    w_{t+1} = w_t + eta (mu v_t + Delta_t)                      (nesterov, as torch.optim.SGD)

Against ``flwr.server.strategy.FedAvgM`` (flwr 1.41): the same update with ``server_learning_rate = eta`` and
``server_momentum = mu``. Flower keeps the buffer as the negated pseudo-gradient w - mean(local) and starts it at
the first pseudo-gradient, which equals v_0 = 0 followed by one update; it has no Nesterov option; its default
momentum is 0.0 (fedlm: 0.9); and it decides "first round" from ``server_round == 1`` while fedlm keys on its own
(checkpointed) buffer. With mu = 0 and eta = 1 both reduce to FedAvg.

Fixed point: from a fresh state, zero updates leave the parameters unchanged, and K identical updates Delta give the
same result as one such update (``w + eta Delta``, or ``w + eta (1 + mu) Delta`` with Nesterov). Once the buffer is
non-zero the server keeps moving along it, so ``returns_mean_update`` is False.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from pydantic import Field

from fedlm.aggregation.base import AggregationResult, Aggregator, AggregatorParams, register_aggregator
from fedlm.aggregation.weights import example_weights, global_norm, weighted_sum
from fedlm.core.update import ClientUpdate, TensorDict


class FedAvgMStep(NamedTuple):
    """The next global tensors and the next momentum buffer (float32)."""

    params: TensorDict
    momentum: TensorDict


def fedavgm_step(
    params: Mapping[str, torch.Tensor],
    mean_delta: Mapping[str, torch.Tensor],
    buffer: Mapping[str, torch.Tensor],
    *,
    server_lr: float,
    momentum: float,
    nesterov: bool = False,
) -> FedAvgMStep:
    """One FedAvgM server step: v = mu v + Delta; w + eta v (or w + eta (mu v + Delta) with Nesterov).

    Args:
        params: The current global tensors w_t (any float dtype; the result keeps it).
        mean_delta: The example-weighted mean client delta Delta_t, by the same names.
        buffer: The momentum buffer v_{t-1} by the same names (zeros before the first step).
        server_lr: The server learning rate eta.
        momentum: The momentum factor mu in [0, 1).
        nesterov: Use the Nesterov form of torch.optim.SGD.
    """
    _check_names(params, mean_delta, "mean delta")
    _check_names(params, buffer, "momentum buffer")
    new_params: TensorDict = {}
    new_buffer: TensorDict = {}
    for name, p in params.items():
        delta = mean_delta[name].to(device=p.device, dtype=torch.float32)
        v = momentum * buffer[name].to(device=p.device, dtype=torch.float32) + delta
        direction = momentum * v + delta if nesterov else v
        new_params[name] = (p.to(torch.float32) + server_lr * direction).to(p.dtype)
        new_buffer[name] = v
    return FedAvgMStep(new_params, new_buffer)


def _check_names(params: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse a mapping whose tensor names differ from the global parameters'."""
    if set(other) != set(params):
        raise ValueError(
            f"FedAvgM {what} has tensors {sorted(other)} but the global parameters are {sorted(params)}; "
            "the trainable parameter set must stay the same between rounds"
        )


@register_aggregator("fedavgm")
class FedAvgM(Aggregator):
    """Example-weighted averaging followed by a server SGD step with momentum; state: the momentum buffer."""

    class Params(AggregatorParams):
        """FedAvgM's parameters (Hsu et al. 2019 use eta = 1 and tune mu; 0.9 is the usual choice)."""

        server_lr: float = Field(1.0, gt=0, allow_inf_nan=False, description="server learning rate eta")
        momentum: float = Field(0.9, ge=0, lt=1, description="server momentum factor mu, in [0, 1)")
        nesterov: bool = Field(False, description="use Nesterov momentum (torch.optim.SGD form)")

    params: FedAvgM.Params
    returns_mean_update = False
    # Server state lives in whatever space the LoRA mode gives the aggregator (the dense products B A under
    # `exact`), which stays the same across rounds, so every LoRA mode is fine.

    def __init__(self, params: AggregatorParams) -> None:
        if not isinstance(params, FedAvgM.Params):
            raise TypeError(f"FedAvgM needs FedAvgM.Params, got {type(params).__name__}")
        super().__init__(params)
        self._buffer: TensorDict = {}
        self._step = 0

    def aggregate(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> AggregationResult:
        """w + eta v with v = mu v + (example-weighted mean delta)."""
        mean_delta = weighted_sum([u.tensors for u in updates], example_weights([u.num_examples for u in updates]))
        buffer = self._buffer or {n: torch.zeros_like(p, dtype=torch.float32) for n, p in global_params.items()}
        c = self.params
        out = fedavgm_step(global_params, mean_delta, buffer, server_lr=c.server_lr, momentum=c.momentum, nesterov=c.nesterov)
        self._buffer, self._step = out.momentum, self._step + 1
        applied = {n: out.params[n].to(torch.float32) - global_params[n].to(torch.float32) for n in global_params}
        metrics = {
            "num_updates": float(len(updates)),
            "update_norm": global_norm(mean_delta),
            "server_step_norm": global_norm(applied),
            "momentum_norm": global_norm(out.momentum),
            "server_step": float(self._step),
        }
        return AggregationResult(params=out.params, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        """``{"step": int64 scalar, "momentum": {name: float32 tensor}}`` (empty buffer before the first round)."""
        return {
            "step": torch.tensor(self._step, dtype=torch.int64),
            "momentum": {n: t.detach().clone() for n, t in self._buffer.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; an empty mapping means a fresh start."""
        unknown = set(state) - {"step", "momentum"}
        if unknown:
            raise ValueError(f"aggregator 'fedavgm' got unknown state keys {sorted(unknown)}")
        self._step = int(state.get("step", 0))
        momentum = state.get("momentum", {})
        self._buffer = {n: torch.as_tensor(t).detach().clone().to(torch.float32) for n, t in momentum.items()}
