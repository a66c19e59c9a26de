"""The ``watermark`` section: the server's ownership watermark of the global adapter and per-client leak tracing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedlm.config.schema.section import Section


class WatermarkConfig(Section):
    """A backdoor watermark trained into the global adapter by the server after every aggregation (WAFFLE, Tekgul
    et al. 2021), from a secret key; with ``per_client`` each client downloads its own differently marked copy, so a
    leaked copy names its client (``fedlm watermark trace``). Off while ``secret`` is unset.

    The key is saved with the run's resolved ``config.yaml``: the run folder is the server's, keep it private.
    """

    secret: str | None = Field(None, min_length=1, description="the watermark key; unset: no watermark")
    size: int = Field(64, ge=1, le=4096, description="triggers in the shared (global) trigger set")
    steps: int = Field(40, ge=1, description="server fine-tuning steps on the triggers after each aggregation (with `until`, the most)")
    lr: float | None = Field(None, gt=0, description="learning rate of those steps (default: `federation.lr`)")
    batch_size: int = Field(8, ge=1, description="triggers per step")
    per_client: bool = Field(False, description="leak tracing: every client downloads its own marked copy; the aggregation uses the unmarked model")
    client_size: int = Field(32, ge=1, le=4096, description="triggers in each client's own set (per_client)")
    client_steps: int = Field(
        20, ge=1, description="fine-tuning steps of each client's copy on its set and the shared one (per_client; with `until`, the most)"
    )
    start_steps: int = Field(
        150,
        ge=0,
        description="WAFFLE's pre-training: steps on the shared triggers of the initial model before round 1 (with `until`, the most); "
        "0: the first mark comes after round 1's aggregation",
    )
    retain: int = Field(
        64,
        ge=0,
        le=1024,
        description="conversations the model writes itself before each embedding and trains on with the triggers, so it keeps answering "
        "as before outside them (data-free rehearsal, LAMOL); 0: triggers only",
    )
    retain_loss: Literal["sft", "kl"] = Field(
        "kl",
        description="how the retain conversations are trained on: `sft` their text; `kl` the marked state's own next-token "
        "distributions on them (distillation: no pull before the mark moves the model)",
    )
    until: float | None = Field(
        0.75,
        gt=0,
        le=1,
        description="re-embed only until the trigger accuracy reaches this share (WAFFLE's stopping rule), checked before the first step "
        "and every `check_every` steps; `steps` / `client_steps` are then the most; unset: always all the steps",
    )
    check_every: int = Field(10, ge=1, description="steps between two checks of the trigger accuracy (with `until`)")

    @property
    def enabled(self) -> bool:
        return self.secret is not None

    @model_validator(mode="after")
    def _needs_secret(self) -> WatermarkConfig:
        # a resolved config.yaml lists every default: only a setting that differs from its default asks for the key
        others = {k for k in self.model_fields_set - {"secret"} if getattr(self, k) != type(self).model_fields[k].default}
        if self.secret is None and others:
            raise ValueError(f"`watermark.secret` is required when {', '.join(f'`watermark.{k}`' for k in sorted(others))} is set")
        return self
