"""The ``inference`` section: how ``fedlm generate | chat | serve`` combine a run's global and personal models."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedlm.config.schema.section import Section

Mix = Literal["global", "local", "adapter", "logits"]
MIXES: tuple[str, ...] = ("global", "local", "adapter", "logits")


class InferenceConfig(Section):
    """Which model answers (:mod:`fedlm.inference.mix`); the CLI flags ``--mix --weight --max-weight --combine``
    override it.

    ``mix``: ``global`` (the federated model), ``local`` (the client's personal model), ``adapter`` (the two LoRA
    adapters weighted in one forward pass, as FedDPA, Yang et al. NeurIPS 2024) or ``logits`` (the two models'
    next-token distributions mixed). ``weight`` is the personal side's weight w: a number in [0, 1], or ``auto``:
    per input, ``max_weight * max(0, cos(h(x), c_k))`` with h the mean-pooled base hidden state of the input and c_k
    the client's centroid (FedDPA's instance-wise weighting). ``combine`` (``logits`` only): ``linear``
    p = w p_local + (1 - w) p_global, or ``product`` p ∝ p_local^w p_global^(1 - w) (a product of experts).
    """

    mix: Mix = "global"
    weight: float | Literal["auto"] = Field(0.5, description="weight of the personal model in adapter/logits mixes: 0..1 or auto")
    max_weight: float = Field(1.0, ge=0.0, le=1.0, description="the most `weight: auto` gives the personal model")
    combine: Literal["linear", "product"] = Field("linear", description="logits mix: linear (mixture) or product (of experts, in log space)")

    @field_validator("weight")
    @classmethod
    def _weight_in_unit_interval(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError(f"must lie in [0, 1] or be `auto`, got {value}")
        return value
