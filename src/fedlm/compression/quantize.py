"""Stochastic uniform quantization of one tensor to ``bits`` bits per entry with one scale per block.

QSGD (Alistarh, Grubic, Li, Tomioka & Vojnovic 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization
and Encoding", NeurIPS), Sec. 3.1 with bucketing: the flat tensor is cut into blocks of ``block_size`` entries; a
block v with scale s_v = max_i |v_i| (the max-norm variant the paper uses in its experiments) and s = 2^(bits-1) - 1
levels per sign sends, for each entry,

    Q(v_i) = s_v * sign(v_i) * xi_i / s,    xi_i = l + 1 with probability s |v_i| / s_v - l, else l,
    l = floor(s |v_i| / s_v),

so E[Q(v_i)] = v_i (unbiased) and every value lies on the grid s_v * {-s, ..., s} / s. The code sign * xi + s of
each entry takes 2s + 1 = 2^bits - 1 values and is packed into exactly ``bits`` bits; the message is the packed
codes (uint8, ceil(n * bits / 8) bytes) and the float32 block scales (ceil(n / block_size) of them).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def levels(bits: int) -> int:
    """s = 2^(bits-1) - 1: the levels on each side of zero."""
    return 2 ** (bits - 1) - 1


def quantize_encode(tensor: torch.Tensor, bits: int, block_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes as uint8, float32 block scales) of ``tensor``; the rounding draws from ``generator``."""
    s = levels(bits)
    flat = tensor.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    blocks = math.ceil(n / block_size)
    padded = torch.zeros(blocks * block_size, dtype=torch.float32)
    padded[:n] = flat
    padded = padded.reshape(blocks, block_size)  # (blocks, B)
    scales = padded.abs().amax(dim=1)  # (blocks,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    scaled = (padded.abs() / safe[:, None] * s).clamp(max=s)  # in [0, s]
    lower = scaled.floor()
    level = lower + (torch.rand(scaled.shape, generator=generator) < scaled - lower).to(torch.float32)
    codes = (torch.sign(padded) * level + s).reshape(-1)[:n].to(torch.uint8)  # in [0, 2s]
    return pack_bits(codes, bits), scales


def quantize_decode(packed: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of ``shape`` that :func:`quantize_encode` encoded."""
    s = levels(bits)
    n = math.prod(shape)
    codes = unpack_bits(packed, bits, n).to(torch.float32) - s  # (n,) in [-s, s]
    per_entry = scales.to(torch.float32).repeat_interleave(block_size)[:n]
    return (codes * per_entry / s).reshape(shape)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``codes`` (each < 2^bits) packed ``bits`` bits each, most significant first, into ceil(n bits / 8) bytes."""
    array = codes.numpy().astype(np.uint8)
    per_code = np.unpackbits(array[:, None], axis=1)[:, 8 - bits :]  # (n, bits)
    return torch.from_numpy(np.packbits(per_code.reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of :func:`pack_bits`'s bytes, as int64."""
    stream = np.unpackbits(packed.numpy().astype(np.uint8))[: count * bits].reshape(count, bits)
    full = np.zeros((count, 8), dtype=np.uint8)
    full[:, 8 - bits :] = stream
    return torch.from_numpy(np.packbits(full, axis=1).reshape(-1).astype(np.int64))


def packed_length(count: int, bits: int) -> int:
    """Bytes of ``count`` packed codes."""
    return math.ceil(count * bits / 8)
