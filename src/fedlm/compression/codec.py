"""A direction's compressor as an encoder of tensor dicts into the message that travels, and its decoder.

A message is itself a dict of tensors (serialised as one safetensors blob like every fedlm message): for a tensor
``name`` it holds ``name|idx`` and ``name|val`` (top-k, :mod:`fedlm.compression.topk`) or ``name|q`` and
``name|scale`` (quantize, :mod:`fedlm.compression.quantize`). The decoder knows the dense shapes from the global
state and refuses a malformed message with the reason (a client's bad upload is rejected, not crashed on).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedlm.compression.quantize import levels, packed_length, quantize_decode, quantize_encode, unpack_bits
from fedlm.compression.topk import index_dtype, kept_count, topk_decode, topk_encode
from fedlm.config.schema.compression import CodecConfig
from fedlm.core.update import TensorDict

SEP = "|"
Shapes = Mapping[str, tuple[int, ...]]


class MalformedMessage(ValueError):
    """An encoded message that does not decode to the expected tensors; the text says why."""


@dataclass(frozen=True)
class Codec:
    """Top-k or quantize with its settings (:class:`~fedlm.config.schema.compression.CodecConfig`)."""

    method: str
    ratio: float = 1.0
    bits: int = 8
    block_size: int = 64
    error_feedback: bool = False

    @classmethod
    def from_config(cls, config: CodecConfig) -> Codec:
        """The codec a config section describes."""
        return cls(config.method, config.ratio or 1.0, config.bits or 8, config.block, config.feedback)

    def describe(self) -> str:
        """``topk 0.1 (error feedback)`` / ``quantize 4 bits, blocks of 64``."""
        what = f"topk {self.ratio:g}" if self.method == "topk" else f"quantize {self.bits} bits, blocks of {self.block_size}"
        return what + (" (error feedback)" if self.error_feedback else "")

    def encode(self, tensors: Mapping[str, torch.Tensor], generator: torch.Generator) -> TensorDict:
        """The message of ``tensors`` (``generator``: quantize's stochastic rounding; top-k draws nothing)."""
        message: TensorDict = {}
        for name in sorted(tensors):
            if self.method == "topk":
                message[name + SEP + "idx"], message[name + SEP + "val"] = topk_encode(tensors[name], self.ratio)
            else:
                message[name + SEP + "q"], message[name + SEP + "scale"] = quantize_encode(tensors[name], self.bits, self.block_size, generator)
        return message

    def decode(self, message: Mapping[str, torch.Tensor], shapes: Shapes) -> TensorDict:
        """Dense float32 tensors of ``shapes`` from ``message``; :class:`MalformedMessage` when it does not fit."""
        parts = ("idx", "val") if self.method == "topk" else ("q", "scale")
        expected = {name + SEP + part for name in shapes for part in parts}
        if set(message) != expected:
            missing, extra = sorted(expected - set(message)), sorted(set(message) - expected)
            raise MalformedMessage(f"the {self.method} message's parts differ from the model's (missing {missing[:2]}, extra {extra[:2]})")
        out: TensorDict = {}
        for name, shape in shapes.items():
            first, second = message[name + SEP + parts[0]], message[name + SEP + parts[1]]
            n = math.prod(shape)
            if self.method == "topk":
                _check_topk(name, first, second, n, self.ratio)
                out[name] = topk_decode(first, second, shape)
            else:
                _check_quantize(name, first, second, n, self.bits, self.block_size)
                out[name] = quantize_decode(first, second, self.bits, self.block_size, shape)
        return out


def _check_topk(name: str, indices: torch.Tensor, values: torch.Tensor, n: int, ratio: float) -> None:
    k = kept_count(n, ratio)
    if indices.dtype != index_dtype(n) or tuple(indices.shape) != (k,):
        raise MalformedMessage(f"{name}: top-k indices must be {k} of dtype {index_dtype(n)}, got {tuple(indices.shape)} {indices.dtype}")
    if values.dtype != torch.float32 or tuple(values.shape) != (k,):
        raise MalformedMessage(f"{name}: top-k values must be {k} float32, got {tuple(values.shape)} {values.dtype}")
    wide = indices.to(torch.int64)
    if k and (int(wide.min()) < 0 or int(wide.max()) >= n or bool((wide[1:] <= wide[:-1]).any())):
        raise MalformedMessage(f"{name}: top-k indices must be distinct, ascending and in [0, {n})")


def _check_quantize(name: str, packed: torch.Tensor, scales: torch.Tensor, n: int, bits: int, block_size: int) -> None:
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (packed_length(n, bits),):
        raise MalformedMessage(f"{name}: packed codes must be {packed_length(n, bits)} uint8, got {tuple(packed.shape)} {packed.dtype}")
    blocks = math.ceil(n / block_size)
    if scales.dtype != torch.float32 or tuple(scales.shape) != (blocks,) or not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise MalformedMessage(f"{name}: block scales must be {blocks} finite non-negative float32 values")
    if n:
        if int(unpack_bits(packed, bits, n).max()) > 2 * levels(bits):
            raise MalformedMessage(f"{name}: a code is above 2^{bits} - 2, outside the quantization grid")


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape."""
    return {name: tuple(t.shape) for name, t in tensors.items()}
