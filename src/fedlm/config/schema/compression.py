"""The ``compression`` section: how client updates (``uplink``) and the global model (``downlink``) are encoded."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedlm.config.schema.section import Section


class CodecConfig(Section):
    """One direction's compressor.

    ``topk`` keeps the ``ratio`` largest-magnitude entries of each tensor (Stich et al. 2018), with error feedback by
    default; ``quantize`` sends ``bits`` bits per entry with a float32 scale per block of ``block_size`` entries
    (QSGD, Alistarh et al. 2017), unbiased, without error feedback by default."""

    method: Literal["topk", "quantize"]
    ratio: float | None = Field(None, gt=0.0, le=1.0, description="topk: the share of each tensor's entries kept")
    bits: int | None = Field(None, ge=2, le=8, description="quantize: bits per entry (2-8)")
    block_size: int | None = Field(None, ge=1, description="quantize: entries per scale (default 64)")
    error_feedback: bool | None = Field(None, description="keep what was not sent and add it next round (default: topk yes, quantize no)")

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> CodecConfig:
        if self.method == "topk":
            if self.ratio is None:
                raise ValueError("`ratio` is required with method topk (the share of entries kept, e.g. 0.1)")
            if self.bits is not None or self.block_size is not None:
                raise ValueError("`bits` and `block_size` are quantize settings, not topk ones")
        else:
            if self.bits is None:
                raise ValueError("`bits` is required with method quantize (2-8)")
            if self.ratio is not None:
                raise ValueError("`ratio` is a topk setting, not a quantize one")
        return self

    @property
    def feedback(self) -> bool:
        """Whether error feedback is on (the default by method when not given)."""
        return self.error_feedback if self.error_feedback is not None else self.method == "topk"

    @property
    def block(self) -> int:
        """The quantize block size (64 when not given)."""
        return self.block_size or 64


class CompressionConfig(Section):
    """Compression of what travels each round; ``None`` sends the dense float32 tensors."""

    uplink: CodecConfig | None = Field(None, description="the clients' updates")
    downlink: CodecConfig | None = Field(None, description="the global model sent to the clients")
