"""The attack harness: what malicious clients do to their updates (model poisoning) or their data (data poisoning).

Pure transforms only; the server loop decides which clients are malicious and calls them. ``ATTACKS`` names every
attack (in the registry, by ``attack.name``) with its kind, its parameters (a pydantic model, unknown keys refused) and
its function:

* kind ``update``: a function of tensor mappings (the malicious client's delta, or with ``omniscient`` the honest
  deltas of the round) returning the delta to send: :mod:`fedlm.attacks.model_poisoning`;
* kind ``data``: a function of the malicious client's training records and a seed returning new records:
  :mod:`fedlm.attacks.data_poisoning`.

Every transform returns new objects and never changes its input (attacks wrap, never mutate).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fedlm.attacks.data_poisoning import BackdoorParams, CorruptResponsesParams, corrupt_responses, insert_backdoor
from fedlm.attacks.model_poisoning import (
    AlieParams,
    AttackParams,
    GaussianNoiseParams,
    IpmParams,
    ScalingParams,
    SignFlipParams,
    alie,
    gaussian_noise,
    ipm,
    scaling,
    sign_flip,
)
from fedlm.attacks.safety import SafetyParams, harmful_compliance
from fedlm.core.params import validate_params
from fedlm.core.registry import Registry


@dataclass(frozen=True)
class AttackSpec:
    """One registered attack.

    Attributes:
        name: The attack's name in the config.
        kind: ``update`` (transforms a delta) or ``data`` (transforms training records).
        params: The pydantic model of its parameters.
        fn: The pure transform.
        omniscient: True when the update attack is computed from the honest deltas of the round (ALIE, IPM).
    """

    name: str
    kind: Literal["update", "data"]
    params: type[AttackParams]
    fn: Callable[..., Any]
    omniscient: bool = False


ATTACKS: Registry[AttackSpec] = Registry("attack", "attack.name")
"""Every attack by its ``attack.name``."""

for _spec in (
    AttackSpec("sign_flip", "update", SignFlipParams, sign_flip),
    AttackSpec("scaling", "update", ScalingParams, scaling),
    AttackSpec("gaussian_noise", "update", GaussianNoiseParams, gaussian_noise),
    AttackSpec("alie", "update", AlieParams, alie, omniscient=True),
    AttackSpec("ipm", "update", IpmParams, ipm, omniscient=True),
    AttackSpec("corrupt_responses", "data", CorruptResponsesParams, corrupt_responses),
    AttackSpec("backdoor", "data", BackdoorParams, insert_backdoor),
    AttackSpec("safety", "data", SafetyParams, harmful_compliance),
):
    ATTACKS.register(_spec.name, _spec)


def attack_spec(name: str) -> AttackSpec:
    """The registered attack ``name``; an unknown name lists the valid ones."""
    return ATTACKS.get(name)


def build_attack_params(name: str, params: Mapping[str, Any], where: str = "attack") -> AttackParams:
    """Validate ``params`` for attack ``name``; errors name the field (``<where>.<field>``) and the problem."""
    return validate_params(attack_spec(name).params, params, where, "attack", name)


__all__ = ["ATTACKS", "AttackSpec", "attack_spec", "build_attack_params"]
