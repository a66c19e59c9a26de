"""Model poisoning: how a malicious client turns its update (the delta ``local - global``) into the one it sends.

Every attack is a pure function on tensor mappings (name -> tensor): the inputs are never changed, the answer is
a new mapping of float32 tensors, built in sorted-name order so random draws do not depend on dict order.

* :func:`sign_flip` and :func:`scaling` change the attacker's own delta; :func:`scaling` with
  :func:`replacement_factor` is the model replacement of Bagdasaryan et al. 2020.
* :func:`gaussian_noise` adds (or sends only) Gaussian noise, drawn from an explicit ``torch.Generator``.
* :func:`alie` and :func:`ipm` are omniscient: they are computed from the honest deltas of the round, which the
  attacker of the papers observes (or estimates); the attacker's own delta is not used.

Each attack's ``Params`` (pydantic, unknown keys refused) is the user-facing validation; the functions check their
arguments again, with ``ValueError`` messages that say the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedlm.core.update import TensorDict

TensorMap = Mapping[str, torch.Tensor]


class AttackParams(BaseModel):
    """Base of every attack's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------------- own delta


class SignFlipParams(AttackParams):
    """Sign flipping: send -scale * delta (gradient ascent on the attacker's data)."""

    scale: float = Field(1.0, gt=0, allow_inf_nan=False, description="magnitude of the flipped delta, > 0")


def sign_flip(delta: TensorMap, scale: float = 1.0) -> TensorDict:
    """-scale * Delta per tensor: the update pushes the global model up the attacker's loss.

    The "sign flipping" Byzantine behaviour of the robust-aggregation literature (e.g. Li et al. 2019, RSA; the
    "reverse gradient" attack); scale 1 sends exactly the negative of the honest update.
    """
    _check_finite("scale", scale)
    return {name: -float(scale) * delta[name].to(torch.float32) for name in sorted(delta)}


class ScalingParams(AttackParams):
    """Scaling (boosting) by a fixed factor; see :func:`replacement_factor` for the model-replacement value."""

    factor: float = Field(gt=0, allow_inf_nan=False, description="multiplier of the delta, > 0 (n / server_lr replaces the model)")


def replacement_factor(num_clients: int, server_lr: float) -> float:
    """gamma = n / eta, the boost that makes the attacker's model replace the global one.

    Bagdasaryan, Veit, Hua, Estrin & Shmatikov 2020, "How To Backdoor Federated Learning" (AISTATS), Sec. 4,
    eq. 3: with the global step G^{t+1} = G^t + eta/n * sum_i (L_i - G^t), the attacker submits
    gamma (X - G^t) + G^t, gamma = n / eta; if the honest deltas roughly cancel, G^{t+1} ~ X.

    fedlm's FedAvg weights client k by p_k = n_k / sum_j n_j instead of 1/n; the exact factor there is
    1 / (p_k * server_lr), which equals n / server_lr when all clients hold as many examples.
    """
    if num_clients < 1:
        raise ValueError(f"replacement_factor needs num_clients >= 1 (clients per round), got {num_clients}")
    if not (server_lr > 0 and math.isfinite(server_lr)):
        raise ValueError(f"replacement_factor needs a finite server_lr > 0, got {server_lr}")
    return num_clients / server_lr


def scaling(delta: TensorMap, factor: float) -> TensorDict:
    """factor * Delta per tensor; with factor = :func:`replacement_factor` (n / eta) the model replacement of
    Bagdasaryan et al. 2020, eq. 3 (the delta is X - G^t, so gamma (X - G^t) is the boosted delta)."""
    _check_finite("factor", factor)
    return {name: float(factor) * delta[name].to(torch.float32) for name in sorted(delta)}


class GaussianNoiseParams(AttackParams):
    """Gaussian noise added to the delta, or sent instead of it (``replace: true``)."""

    std: float = Field(ge=0, allow_inf_nan=False, description="standard deviation of the noise per coordinate, >= 0")
    replace: bool = Field(False, description="send pure noise N(0, std^2) instead of delta + noise")


def gaussian_noise(delta: TensorMap, std: float, generator: torch.Generator, *, replace: bool = False) -> TensorDict:
    """Delta + N(0, std^2 I) per coordinate, or N(0, std^2 I) alone with ``replace=True``.

    The "Gaussian" Byzantine worker of Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent" (NeurIPS), Sec. 6. Noise is drawn on the CPU from ``generator`` (a
    :func:`fedlm.core.seeding.torch_generator`), tensor by tensor in sorted-name order, then moved to each tensor's device.
    """
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"gaussian_noise needs a finite std >= 0, got {std}; set `std` to a non-negative number")
    out: TensorDict = {}
    for name in sorted(delta):
        base = delta[name].to(torch.float32)
        noise = torch.randn(base.shape, generator=generator, dtype=torch.float32).to(base.device) * float(std)
        out[name] = noise if replace else base + noise
    return out


# ------------------------------------------------------------------------------------------- omniscient attacks


class AlieParams(AttackParams):
    """A Little Is Enough: the federation size n and the number f of colluding malicious clients (f < n / 2)."""

    num_clients: int | None = Field(None, ge=3, description="n, the number of clients whose updates the server aggregates (default: this round's)")
    num_malicious: int | None = Field(None, ge=1, description="f, the number of malicious clients, 1 <= f < n / 2 (default: this round's attackers)")
    correction: int = Field(1, ge=0, le=1, description="std of the honest deltas: 1 sample (Bessel), 0 population")

    @model_validator(mode="after")
    def _minority(self) -> AlieParams:
        if self.num_clients is not None and self.num_malicious is not None and 2 * self.num_malicious >= self.num_clients:
            raise ValueError(_minority_message(self.num_clients, self.num_malicious))
        return self


def alie_z_max(num_clients: int, num_malicious: int) -> float:
    """z_max = Phi^{-1}((n - s) / n), s = floor(n / 2 + 1) - f.

    Baruch, Baruch & Goldberg 2019, "A Little Is Enough: Circumventing Defenses For Distributed Learning"
    (NeurIPS), Sec. 4 and Algorithm 3: s is the number of honest clients the attackers need "on their side" for a
    majority; z_max is the largest z with Phi(z) < (n - s) / n, so that enough honest clients lie farther from the
    mean than the malicious value. E.g. n = 50, f = 12: s = 14, z_max = Phi^{-1}(0.72) = 0.5828.
    """
    if num_malicious < 1 or 2 * num_malicious >= num_clients:
        raise ValueError(_minority_message(num_clients, num_malicious))
    supporters = math.floor(num_clients / 2 + 1) - num_malicious  # s
    return NormalDist().inv_cdf((num_clients - supporters) / num_clients)


def alie(honest_deltas: Sequence[TensorMap], num_clients: int, num_malicious: int, *, correction: int = 1) -> TensorDict:
    """mu_j - z_max * sigma_j per coordinate j over the honest deltas (Baruch et al. 2019, Algorithm 3).

    mu and sigma are the coordinate-wise mean and standard deviation of the honest (benign) deltas the attacker
    observes. ``correction=1`` (default) is the sample std (Bessel, divisor H - 1), as the paper's estimate from
    observed gradients and ``torch.std``'s default used by its reference implementations; ``correction=0`` gives
    the population std (divisor H). Every malicious client sends this same delta.
    """
    z_max = alie_z_max(num_clients, num_malicious)
    stacked = _stack(honest_deltas, minimum=1 + correction, what="alie")
    out: TensorDict = {}
    for name, values in stacked.items():  # values: (H, *shape)
        sigma = torch.std(values, dim=0, correction=correction)
        out[name] = values.mean(dim=0) - z_max * sigma
    return out


class IpmParams(AttackParams):
    """Inner Product Manipulation: the size epsilon of the reversed mean."""

    epsilon: float = Field(0.1, gt=0, allow_inf_nan=False, description="malicious = -epsilon * mean(honest), > 0")


def ipm(honest_deltas: Sequence[TensorMap], epsilon: float) -> TensorDict:
    """-epsilon * mean(honest deltas), per coordinate (unweighted mean).

    Xie, Koyejo & Gupta 2020, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product Manipulation"
    (UAI), Sec. 3-4: every Byzantine worker sends -epsilon * (1/H) sum_i g_i, making the inner product of the
    aggregate with the true gradient negative; a small epsilon (0.1) passes Krum, a larger one (0.5) beats the
    median and the trimmed mean in their experiments.
    """
    _check_finite("epsilon", epsilon)
    return {name: -float(epsilon) * values.mean(dim=0) for name, values in _stack(honest_deltas, 1, "ipm").items()}


# --------------------------------------------------------------------------------------------------- helpers


def _stack(deltas: Sequence[TensorMap], minimum: int, what: str) -> dict[str, torch.Tensor]:
    """Per name, the deltas stacked along a new first axis, (H, *shape) float32; every delta needs the same names."""
    if len(deltas) < minimum:
        raise ValueError(f"{what} needs at least {minimum} honest deltas this round, got {len(deltas)}")
    names = sorted(deltas[0])
    for i, d in enumerate(deltas):
        if sorted(d) != names:
            raise ValueError(f"{what}: honest delta {i} has tensors {sorted(d)}, the first has {names}; they must match")
    return {name: torch.stack([d[name].to(torch.float32) for d in deltas]) for name in names}


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value}")


def _minority_message(num_clients: int, num_malicious: int) -> str:
    return (
        f"ALIE needs 1 <= num_malicious < num_clients / 2 (a malicious minority), got num_malicious={num_malicious} "
        f"and num_clients={num_clients}; lower `num_malicious` or raise `num_clients`"
    )
