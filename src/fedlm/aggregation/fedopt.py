"""Adaptive federated optimisation (FedOpt): the server step shared by FedAdagrad, FedAdam and FedYogi.

Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar & McMahan 2021, "Adaptive Federated Optimization" (ICLR),
Algorithm 2. With Delta_t the mean client delta (local - global) of round t, m_{-1} = 0 and v_{-1} given:

    m_t     = beta1 m_{t-1} + (1 - beta1) Delta_t
    v_t     = v_{t-1} + Delta_t^2                                         (FedAdagrad)
    v_t     = beta2 v_{t-1} + (1 - beta2) Delta_t^2                       (FedAdam)
    v_t     = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)   (FedYogi)
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

Choices and differences, against the paper and against ``flwr.server.strategy.FedAdagrad/FedAdam/FedYogi``
(flwr 1.41, ``fedopt.py`` and the three strategy files):

- Delta_t is the example-weighted mean sum_k (n_k / n) Delta_k, as in Flower (which averages the local models
  with the same weights and subtracts its current weights). Algorithm 2 writes the unweighted mean over the
  sampled clients, (1 / |S|) sum_i Delta_i; the two agree when every client has as many examples.
  Flower's form, mean(local) - x, loses digits when the deltas are tiny against the weights; fedlm averages the
  deltas themselves.
- v_{-1}: Algorithm 2 asks for v_{-1} >= tau^2; Flower starts m and v at zeros. ``initial_accumulator`` (default
  0.0, as Flower) sets v_{-1}; ``tau ** 2`` follows the paper.
- tau: Reddi et al. tune tau and report that tau around 1e-3 works well across tasks; fedlm defaults to 1e-3 for
  the three variants. Flower defaults to 1e-9 (FedAdagrad, FedAdam) and 1e-3 (FedYogi), and eta to 0.1
  (FedAdagrad, FedAdam) and 0.01 (FedYogi); fedlm uses eta = 0.01 for all.
- Bias correction: Algorithm 2 has none, and neither do Flower's FedAdagrad and FedYogi. Flower's FedAdam always
  uses eta_r = eta sqrt(1 - beta2^(r+1)) / (1 - beta1^(r+1)) with r = ``server_round`` (1 at the first round), one
  step ahead of Kingma & Ba. fedlm's ``bias_correction`` (off by default) uses Kingma & Ba 2015, "Adam: A Method
  for Stochastic Optimization", Section 2 (the line before 2.1): eta_t = eta sqrt(1 - beta2^t) / (1 - beta1^t),
  t = the number of server steps taken, 1 at the first. The pure step takes eta as an argument, so any schedule
  (Flower's included) can be passed per round.
- Flower's FedAdagrad fixes beta1 = 0 (no server momentum); fedlm's defaults to 0 and lets it be set.

Fixed point (``returns_mean_update = False``): from a fresh state (m = 0), zero updates leave the parameters
unchanged (m_t = 0 and tau > 0), and K identical updates Delta give the same result as one such update (their mean
is Delta), but not ``x + Delta``: the step is eta m_t / (sqrt(v_t) + tau).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from pydantic import Field

from fedlm.aggregation.base import AggregationResult, Aggregator, AggregatorParams
from fedlm.aggregation.weights import example_weights, global_norm, weighted_sum
from fedlm.core.update import ClientUpdate, TensorDict

Variant = Literal["adagrad", "adam", "yogi"]
_STATE_KEYS = frozenset({"step", "m", "v"})


class FedOptStep(NamedTuple):
    """The next global tensors and the next first and second moments (float32)."""

    params: TensorDict
    m: TensorDict
    v: TensorDict


def first_moment(m: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], beta1: float) -> TensorDict:
    """m_t = beta1 m_{t-1} + (1 - beta1) Delta_t (Algorithm 2, every variant)."""
    return {name: beta1 * m[name] + (1.0 - beta1) * d for name, d in delta.items()}


def second_moment(v: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], *, variant: Variant, beta2: float) -> TensorDict:
    """v_t of Algorithm 2 for ``variant`` (``beta2`` is ignored by Adagrad)."""
    out: TensorDict = {}
    for name, d in delta.items():
        sq = d * d
        if variant == "adagrad":
            out[name] = v[name] + sq
        elif variant == "adam":
            out[name] = beta2 * v[name] + (1.0 - beta2) * sq
        elif variant == "yogi":
            out[name] = v[name] - (1.0 - beta2) * sq * torch.sign(v[name] - sq)
        else:
            raise ValueError(f"unknown FedOpt variant {variant!r}; valid: adagrad, adam, yogi")
    return out


def fedopt_step(
    params: Mapping[str, torch.Tensor],
    mean_delta: Mapping[str, torch.Tensor],
    m: Mapping[str, torch.Tensor],
    v: Mapping[str, torch.Tensor],
    *,
    variant: Variant,
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> FedOptStep:
    """One server step of Algorithm 2: x + eta m_t / (sqrt(v_t) + tau), float32 math, result in each dtype.

    Args:
        params: The current global tensors x_t.
        mean_delta: The mean client delta Delta_t, by the same names.
        m: The first moment m_{t-1} (zeros before the first step).
        v: The second moment v_{t-1} (v_{-1} before the first step).
        variant: ``adagrad``, ``adam`` or ``yogi`` (how v_t is formed).
        eta: The server learning rate of this step (already bias-corrected if wanted).
        beta1: The first-moment decay in [0, 1).
        beta2: The second-moment decay in [0, 1) (unused by Adagrad).
        tau: The adaptivity (denominator) constant, > 0.
    """
    for what, mapping in (("mean delta", mean_delta), ("first moment", m), ("second moment", v)):
        _check_names(params, mapping, what)
    delta32 = {n: mean_delta[n].to(device=p.device, dtype=torch.float32) for n, p in params.items()}
    m32 = {n: m[n].to(device=p.device, dtype=torch.float32) for n, p in params.items()}
    v32 = {n: v[n].to(device=p.device, dtype=torch.float32) for n, p in params.items()}
    m_t = first_moment(m32, delta32, beta1)
    v_t = second_moment(v32, delta32, variant=variant, beta2=beta2)
    new = {n: (p.to(torch.float32) + eta * m_t[n] / (v_t[n].sqrt() + tau)).to(p.dtype) for n, p in params.items()}
    return FedOptStep(new, m_t, v_t)


def bias_corrected_eta(eta: float, beta1: float, beta2: float, step: int) -> float:
    """eta_t = eta sqrt(1 - beta2^t) / (1 - beta1^t), t >= 1 (Kingma & Ba 2015, line before Section 2.1)."""
    if step < 1:
        raise ValueError(f"bias correction needs a step t >= 1, got {step}")
    return eta * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def initial_moments(params: Mapping[str, torch.Tensor], initial_accumulator: float) -> tuple[TensorDict, TensorDict]:
    """m_{-1} = 0 and v_{-1} = ``initial_accumulator`` for every tensor (float32, on each tensor's device)."""
    m = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    v = {n: torch.full_like(p, initial_accumulator, dtype=torch.float32) for n, p in params.items()}
    return m, v


def _check_names(params: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse a mapping whose tensor names differ from the global parameters'."""
    if set(other) != set(params):
        raise ValueError(
            f"FedOpt {what} has tensors {sorted(other)} but the global parameters are {sorted(params)}; "
            "the trainable parameter set must stay the same between rounds"
        )


class FedOptParams(AggregatorParams):
    """Parameters shared by the three variants."""

    eta: float = Field(1e-2, gt=0, allow_inf_nan=False, description="server learning rate eta")
    beta1: float = Field(0.9, ge=0, lt=1, description="first-moment decay beta1, in [0, 1)")
    tau: float = Field(1e-3, gt=0, allow_inf_nan=False, description="adaptivity tau (Reddi et al.: about 1e-3)")
    initial_accumulator: float = Field(0.0, ge=0, allow_inf_nan=False, description="v_{-1}; 0 as Flower, Reddi et al. ask for >= tau^2")


class AdaptiveMomentParams(FedOptParams):
    """Parameters of the variants with a decaying second moment (Adam, Yogi)."""

    beta2: float = Field(0.99, ge=0, lt=1, description="second-moment decay beta2, in [0, 1)")
    bias_correction: bool = Field(False, description="Kingma & Ba bias correction of eta (t = server steps)")


class FedOptAggregator(Aggregator):
    """Example-weighted mean delta, then one adaptive server step; state: m, v and the step count.

    Subclasses set ``variant`` and a nested ``Params``; they are registered, this base is not.
    """

    variant: ClassVar[Variant]
    Params: ClassVar[type[AggregatorParams]] = FedOptParams
    params: FedOptParams
    returns_mean_update = False
    # Server state lives in whatever space the LoRA mode gives the aggregator (the dense products B A under
    # `exact`), which stays the same across rounds, so every LoRA mode is fine.

    def __init__(self, params: AggregatorParams) -> None:
        if not isinstance(params, FedOptParams):
            raise TypeError(f"{type(self).__name__} needs FedOptParams, got {type(params).__name__}")
        super().__init__(params)
        self._m: TensorDict = {}
        self._v: TensorDict = {}
        self._step = 0

    @property
    def beta2(self) -> float:
        """The second-moment decay (0.0 for Adagrad, which has none)."""
        return self.params.beta2 if isinstance(self.params, AdaptiveMomentParams) else 0.0

    def eta_for_step(self, step: int) -> float:
        """The learning rate of server step ``step`` (1-based), bias-corrected when asked."""
        p = self.params
        if isinstance(p, AdaptiveMomentParams) and p.bias_correction:
            return bias_corrected_eta(p.eta, p.beta1, p.beta2, step)
        return p.eta

    def aggregate(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> AggregationResult:
        """x + eta m_t / (sqrt(v_t) + tau) from the example-weighted mean delta (Algorithm 2)."""
        mean_delta = weighted_sum([u.tensors for u in updates], example_weights([u.num_examples for u in updates]))
        if not self._m:
            self._m, self._v = initial_moments(global_params, self.params.initial_accumulator)
        step = self._step + 1
        eta = self.eta_for_step(step)
        p = self.params
        out = fedopt_step(
            global_params,
            mean_delta,
            self._m,
            self._v,
            variant=self.variant,
            eta=eta,
            beta1=p.beta1,
            beta2=self.beta2,
            tau=p.tau,
        )
        self._m, self._v, self._step = out.m, out.v, step
        applied = {n: out.params[n].to(torch.float32) - global_params[n].to(torch.float32) for n in global_params}
        metrics = {
            "num_updates": float(len(updates)),
            "update_norm": global_norm(mean_delta),
            "server_step_norm": global_norm(applied),
            "first_moment_norm": global_norm(out.m),
            "server_step": float(step),
            "eta": float(eta),
        }
        return AggregationResult(params=out.params, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        """``{"step": int64 scalar, "m": {name: tensor}, "v": {name: tensor}}`` (m, v empty before round 1)."""
        return {
            "step": torch.tensor(self._step, dtype=torch.int64),
            "m": {n: t.detach().clone() for n, t in self._m.items()},
            "v": {n: t.detach().clone() for n, t in self._v.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; an empty mapping means a fresh start."""
        unknown = set(state) - _STATE_KEYS
        if unknown:
            raise ValueError(f"aggregator {self.name!r} got unknown state keys {sorted(unknown)}")
        m, v = state.get("m", {}), state.get("v", {})
        if set(m) != set(v):
            raise ValueError(f"aggregator {self.name!r}: state m and v name different tensors")
        self._step = int(state.get("step", 0))
        self._m = {n: torch.as_tensor(t).detach().clone().to(torch.float32) for n, t in m.items()}
        self._v = {n: torch.as_tensor(t).detach().clone().to(torch.float32) for n, t in v.items()}
