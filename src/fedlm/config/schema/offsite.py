"""The ``offsite`` section: offsite-tuning (Xiao et al. 2023), the clients train adapters on a compressed emulator of
the model and never receive its full middle; optionally with FedBiOT's server-side alignment (Wu et al. 2024).

Whether the layer counts fit the model is judged by :mod:`fedlm.config.rules.offsite` (at config load for the
aliases whose depth is known, else when the model loads)."""

from __future__ import annotations

from pydantic import Field, model_validator

from fedlm.config.schema.section import Section

PUBLIC_TEXT = "embedded:wordnet_text"


class OffsiteConfig(Section):
    """Offsite-tuning: the bottom ``n_bottom`` and top ``n_top`` decoder layers carry the adapters and are sent as
    they are; the layers between them (the middle) are compressed by uniform layer drop to ``keep_ratio`` of them and
    distilled on the server's public text (``emulator_distill_steps``) before the clients receive the emulator.
    ``align_steps`` > 0: FedBiOT's variant, the server re-aligns the emulator's middle to the full model (with the
    current adapter plugged in) for that many steps after every round."""

    n_bottom: int = Field(2, ge=0, description="bottom decoder layers kept as they are, adapted by the clients")
    n_top: int = Field(2, ge=0, description="top decoder layers kept as they are, adapted by the clients")
    keep_ratio: float = Field(0.5, gt=0.0, le=1.0, description="share of the middle layers the emulator keeps (uniform layer drop)")
    emulator_distill_steps: int = Field(0, ge=0, description="distillation steps of the emulator's middle on public text before round 1")
    align_steps: int = Field(0, ge=0, description="FedBiOT: server alignment steps of the emulator after every round (0: off)")
    distill_lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate of distillation and alignment")
    distill_batch_size: int = Field(4, ge=1, description="public-text sequences per distillation step")
    public_data: str = Field(PUBLIC_TEXT, description="the server's public text (records with a `text` field) for distillation")

    @model_validator(mode="after")
    def _some_adapter_layer(self) -> OffsiteConfig:
        if self.n_bottom + self.n_top == 0:
            raise ValueError("`offsite.n_bottom` + `offsite.n_top` must be >= 1: the clients' adapters live on those layers")
        return self
