"""Client-level differential privacy as a wrapper around any aggregator (DP-FedAvg, adaptive clipping).

Central DP. McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent Language Models"
(ICLR), Algorithm 1 (DP-FedAvg) with flat clipping and the fixed-denominator estimator f~_f: each sampled client's
delta is clipped to L2 norm C, Delta_k' = Delta_k * min(1, C / ||Delta_k||), and the server releases

    Delta~ = (sum_k Delta_k' + N(0, (z C)^2 I)) / m,        m = the expected number of clients per round,

the special case w_k = 1 of their sum_k w_k Delta_k / (q W) + N(0, sigma^2 I) with sigma = z S / (q W), S = C and
q W = m. Adding or removing one client moves the sum by at most C, so the Gaussian mechanism with noise multiplier z
applies to every round; an accountant (not here) turns (z, sampling rate, rounds) into (epsilon, delta). The noised
mean goes to the inner aggregator as ONE update, so FedAvg applies it as is and FedAvgM/FedAdam/... take their
server step on it (McMahan et al. also use server momentum on the private mean). Post-processing keeps the DP.

Example weighting is dropped under DP: FedAvg's p_k = n_k / n would make a client's contribution p_k * C depend on
its own data size and everyone else's (so the sensitivity bound C / m no longer holds) and n_k itself is private.
Every client counts once; the denominator is the fixed expected count m, not the number that reported, so a round
with dropouts is scaled down rather than given a data-dependent denominator.

Distributed DP (for secure aggregation). Each client adds its share N(0, (z C)^2 / K) to its own clipped delta
(:func:`client_noise_share`, K = clients per round). Shares are independent, so the sum of the K privatised deltas
carries N(0, K (z C)^2 / K) = N(0, (z C)^2): the same total noise as central DP, and the server (which under secure
aggregation sees only the sum) releases the same distribution. The wrapper in mode ``distributed`` only sums and
divides by m. If fewer than K clients report, the sum carries less noise than (z C)^2 and the guarantee is weaker.
A deployment must seed each client's noise from a secret the server does not know; the simulation's
:meth:`DifferentiallyPrivate.privatize_client_update` derives it from the run seed, which is fine only in simulation.

Adaptive clipping. Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with Adaptive
Clipping" (NeurIPS), Algorithm 1 with the geometric update: with b_i = 1[||Delta_i|| <= C] under the current C,

    b~ = (sum_i b_i + N(0, sigma_b^2)) / m,        C <- C * exp(-eta_C (b~ - gamma)),

defaults gamma = 0.5, eta_C = 0.2, sigma_b = m / 20 (0 when z = 0, as TFF and Flower). The clipped count is a
second Gaussian query (centred b_i - 1/2 has sensitivity 1/2, so its noise multiplier is 2 sigma_b). Composing the
two Gaussian mechanisms, z^-2 = z_Delta^-2 + (2 sigma_b)^-2, so the update noise multiplier that gives the same
privacy as plain DP-FedAvg with multiplier z is (Andrew et al., Sec. 3; "Theorem 1" of arXiv:1905.03871 as
recalled, the theorem number not re-read here)

    z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2),      defined only for z < 2 sigma_b.

The formula and the defaults match TensorFlow Federated's ``DifferentiallyPrivateFactory.gaussian_adaptive`` (by
the paper's authors' team) and Flower's ``compute_adaptive_noise_params``.

The norms, fraction clipped and the clip in the metrics are diagnostics for the (trusted) server operator; only the
released parameters and the noised fraction b~ are private. Sensitivity is measured in the space the aggregator sees
(the LoRA mode's server space).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from fedlm.aggregation.base import AggregationResult, Aggregator, AggregatorParams, aggregator_class, registered_aggregators
from fedlm.core.errors import FedlmError
from fedlm.core.params import validate_params
from fedlm.core.seeding import derive_seed, torch_generator
from fedlm.core.task import ClientContext, TrainerHook
from fedlm.core.update import ClientUpdate
from fedlm.privacy.dp_math import (
    adaptive_noise_multiplier,
    check_finite,
    client_noise_share,
    clip_update,
    geometric_clip_update,
    noised_mean,
    noised_unclipped_fraction,
    update_norm,
)

#: Name of the single update (the noised mean) the inner aggregator receives.
DP_MEAN_ID = "__dp_mean__"

#: What DP does to the updates, said after an aggregator's reason for needing them one by one.
HIDDEN_UNDER_DP = (
    "but under DP it receives one noised sum in which the individual updates are hidden (their norms and directions are exactly what DP protects)"
)


# --------------------------------------------------------------------------- the wrapper


class ClientDPParams(AggregatorParams):
    """Client-level DP settings; ``clip`` is the initial clip under adaptive clipping."""

    noise_multiplier: float = Field(ge=0, allow_inf_nan=False, description="z: noise std on the sum is z * C")
    clip: float = Field(gt=0, allow_inf_nan=False, description="C: the L2 bound of each client delta")
    expected_clients: float = Field(gt=0, allow_inf_nan=False, description="m: expected clients per round (denominator)")
    mode: Literal["central", "distributed"] = Field("central", description="server adds the noise, or the clients")
    adaptive: bool = Field(False, description="adapt C to a quantile of the update norms (Andrew et al. 2021)")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="gamma: the unclipped fraction C tracks")
    clip_lr: float = Field(0.2, gt=0, allow_inf_nan=False, description="eta_C of the geometric update")
    count_noise_std: float | None = Field(None, ge=0, allow_inf_nan=False, description="sigma_b; None: m / 20 (0 if z = 0)")
    seed: int = Field(0, description="seed of the noise, derived per round")

    @model_validator(mode="after")
    def _consistent(self) -> ClientDPParams:
        if self.adaptive and self.mode == "distributed":
            raise ValueError(
                "adaptive clipping with mode distributed is not supported: the clipped count b_i would have to be "
                "summed under secure aggregation too; use mode central or adaptive false"
            )
        if self.adaptive:
            adaptive_noise_multiplier(self.noise_multiplier, default_count_noise_std(self))
        return self


def default_count_noise_std(params: ClientDPParams) -> float:
    """sigma_b as given, else m / 20 when z > 0 and 0 when z = 0 (as TFF's and Flower's adaptive clipping)."""
    if params.count_noise_std is not None:
        return params.count_noise_std
    return params.expected_clients / 20 if params.noise_multiplier > 0 else 0.0


class DifferentiallyPrivate(Aggregator):
    """DP-FedAvg's clip-and-noise around any aggregator that takes a mean update; state: inner, clip, round.

    The noise of round r is drawn from ``derive_seed(seed, "dp-noise", r)`` (the count noise from
    ``"dp-count-noise"``), r counted by the wrapper and saved in its state, so a resumed run draws the same noise.
    """

    name: ClassVar[str] = "client_dp"
    Params: ClassVar[type[AggregatorParams]] = ClientDPParams
    params: ClientDPParams
    returns_mean_update = False  # the output carries noise and a fixed denominator m

    def __init__(self, inner: Aggregator, params: ClientDPParams) -> None:
        refuse_inner(inner)
        super().__init__(params)
        self.inner = inner
        self.clip = params.clip
        self.round = 0

    @classmethod
    def from_config(cls, inner: Aggregator, params: Mapping[str, Any], section: str = "privacy") -> DifferentiallyPrivate:
        """Wrap ``inner`` with parameters from a config section, one FedlmError naming each bad field."""
        return cls(inner, validate_params(ClientDPParams, params, section, "privacy", "client_dp"))

    @property
    def count_noise_std(self) -> float:
        """sigma_b: as given, else m / 20 (Andrew et al. 2021), or 0 when z = 0 (no privacy claimed; TFF, Flower)."""
        return default_count_noise_std(self.params)

    @property
    def update_noise_multiplier(self) -> float:
        """z_Delta under adaptive clipping, else z."""
        z = self.params.noise_multiplier
        return adaptive_noise_multiplier(z, self.count_noise_std) if self.params.adaptive else z

    # Delegation to the inner aggregator (all instance access in fedlm).
    @property
    def needs_stable_parameter_space(self) -> bool:  # type: ignore[override]  # the class capability, read through
        return self.inner.needs_stable_parameter_space

    @property
    def needs_server_update(self) -> bool:  # type: ignore[override]  # the class capability, read through
        return self.inner.needs_server_update  # always False: refused otherwise

    def check_config(self, config: Any) -> None:
        self.inner.check_config(config)

    def start(self, client_names: Sequence[str]) -> None:
        self.inner.start(client_names)

    def trainer_hooks(self) -> list[TrainerHook]:
        return self.inner.trainer_hooks()

    def client_context(self, client_id: str, round_num: int) -> ClientContext:
        return self.inner.client_context(client_id, round_num)

    def privatize_client_update(self, update: ClientUpdate) -> ClientUpdate:
        """Client side of mode ``distributed``: a new update with clip(Delta, C) + its noise share (simulation seed)."""
        if self.params.mode != "distributed":
            raise ValueError("privatize_client_update is the client side of mode distributed")
        gen = torch_generator(derive_seed(self.params.seed, "dp-client-noise", update.round, update.client_id))
        tensors = client_noise_share(
            update.tensors, self.params.noise_multiplier, self.clip, self.params.expected_clients, gen, client_id=update.client_id
        )
        return dataclasses.replace(update, tensors=tensors)

    def aggregate(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Clip, sum, noise, divide by m; the inner aggregator's step on that one noised mean."""
        if not updates:
            raise ValueError("differential privacy needs at least one update per round")
        ordered = sorted(updates, key=lambda u: u.client_id)  # a fixed summation order: client order cannot matter
        for u in ordered:
            check_finite(u.tensors, u.client_id)
            if u.extras:
                raise ValueError(f"client {u.client_id!r} uploaded extras {sorted(u.extras)}, which DP does not privatise")
        p, rnd, clip = self.params, self.round + 1, self.clip
        gen = torch_generator(derive_seed(p.seed, "dp-noise", rnd))
        m = p.expected_clients
        if p.mode == "central":
            pairs = [clip_update(u.tensors, clip, client_id=u.client_id) for u in ordered]
            clipped, norms = [c for c, _ in pairs], [n for _, n in pairs]
            noise_std = self.update_noise_multiplier * clip
            mean = noised_mean(clipped, noise_std=noise_std, expected_clients=m, generator=gen)
        else:  # the clients clipped and added their shares already; clipping again would shrink their noise
            norms = [update_norm(u.tensors) for u in ordered]
            noise_std = p.noise_multiplier * clip * math.sqrt(len(ordered) / m)  # n shares of variance (zC)^2 / m
            mean = noised_mean([u.tensors for u in ordered], noise_std=0.0, expected_clients=m, generator=gen)
        metrics = {
            "dp_clip": clip,
            "dp_update_norm_mean": sum(norms) / len(norms),
            "dp_update_norm_max": max(norms),
            "dp_noise_std": noise_std,
            "dp_mean_noise_std": noise_std / m,
            "dp_noise_multiplier": self.update_noise_multiplier,
        }
        if p.mode == "central":
            metrics["dp_fraction_clipped"] = sum(n > clip for n in norms) / len(norms)
        next_clip = clip
        if p.adaptive:
            count_gen = torch_generator(derive_seed(p.seed, "dp-count-noise", rnd))
            frac = noised_unclipped_fraction(norms, clip, count_noise_std=self.count_noise_std, expected_clients=m, generator=count_gen)
            next_clip = geometric_clip_update(clip, frac, target_quantile=p.target_quantile, clip_lr=p.clip_lr)
            metrics.update(dp_noised_unclipped_fraction=frac, dp_next_clip=next_clip)
        inner = self.inner.aggregate(global_params, [ClientUpdate(DP_MEAN_ID, ordered[0].round, 1, mean)])
        self.round, self.clip = rnd, next_clip
        metrics = {**inner.metrics, **metrics, "num_updates": float(len(updates))}
        return AggregationResult(params=inner.params, metrics=metrics)

    def aggregate_sum(
        self, global_params: Mapping[str, torch.Tensor], total: Mapping[str, torch.Tensor], num_clients: int, round_num: int
    ) -> AggregationResult:
        """Server side under secure aggregation: ``total`` is the decoded sum of ``num_clients`` clipped deltas (in
        mode ``distributed`` with their noise shares); ``central`` adds N(0, (zC)^2) to it; both divide by m."""
        if num_clients < 1:
            raise ValueError("differential privacy needs at least one update per round")
        check_finite(total, "secure sum")
        p, rnd, clip = self.params, self.round + 1, self.clip
        gen = torch_generator(derive_seed(p.seed, "dp-noise", rnd))
        m = p.expected_clients
        if p.mode == "central":
            noise_std = self.update_noise_multiplier * clip
            mean = noised_mean([total], noise_std=noise_std, expected_clients=m, generator=gen)
        else:
            noise_std = p.noise_multiplier * clip * math.sqrt(num_clients / m)
            mean = noised_mean([total], noise_std=0.0, expected_clients=m, generator=gen)
        metrics = {
            "dp_clip": clip,
            "dp_noise_std": noise_std,
            "dp_mean_noise_std": noise_std / m,
            "dp_noise_multiplier": self.update_noise_multiplier,
        }
        inner = self.inner.aggregate(global_params, [ClientUpdate(DP_MEAN_ID, round_num, 1, mean)])
        self.round = rnd
        return AggregationResult(params=inner.params, metrics={**inner.metrics, **metrics, "num_updates": float(num_clients)})

    def state_dict(self) -> dict[str, Any]:
        """``{"inner": inner state, "clip": float64 scalar, "round": int64 scalar}``."""
        return {
            "inner": self.inner.state_dict(),
            "clip": torch.tensor(self.clip, dtype=torch.float64),
            "round": torch.tensor(self.round, dtype=torch.int64),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; an empty mapping means a fresh start."""
        unknown = set(state) - {"inner", "clip", "round"}
        if unknown:
            raise ValueError(f"aggregator {self.name!r} got unknown state keys {sorted(unknown)}")
        self.inner.load_state_dict(state.get("inner", {}))
        self.clip = float(state.get("clip", self.params.clip))
        self.round = int(state.get("round", 0))


def wrap_refusal(inner: type[Aggregator] | Aggregator) -> str | None:
    """Why DP cannot wrap ``inner`` (from its declared capabilities), or None when it can."""
    if isinstance(inner, DifferentiallyPrivate):
        return "it is differentially private already; wrap the base aggregator once"
    if inner.needs_individual_updates is not None:
        reason = f"{inner.needs_individual_updates}, {HIDDEN_UNDER_DP}"
        if inner.uploads_extras is not None:
            reason += f"; and it uploads {inner.uploads_extras} beside the delta, which DP would neither clip nor noise"
        return reason
    if inner.uploads_extras is not None:
        return f"it uploads {inner.uploads_extras} beside the delta, which DP would neither clip nor noise"
    if inner.needs_server_update:
        return "it needs the server's own update and the individual client updates to compare with it"
    return None


def dp_compatible_aggregators() -> list[str]:
    """Names of the registered aggregators DP can wrap."""
    return [name for name in registered_aggregators() if wrap_refusal(aggregator_class(name)) is None]


def refuse_inner(inner: Aggregator) -> None:
    """Raise FedlmError when DP cannot wrap ``inner`` (it needs individual updates, or is DP already)."""
    reason = wrap_refusal(inner)
    if reason is None:
        return
    name = getattr(inner, "name", type(inner).__name__)
    raise FedlmError(
        f"differential privacy cannot wrap `aggregation.name: {name}`: {reason}; "
        f"use one of {', '.join(dp_compatible_aggregators())} with `privacy`, or turn `privacy` off"
    )
