"""Bytes on the wire: the size of what a client downloads and uploads, as safetensors would serialise it.

The count is the length of ``safetensors.torch.save`` of the tensors that actually travel (LoRA factors cut to the
client's rank, plus algorithm extras such as SCAFFOLD's control variates), header included.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import save


def serialized_bytes(*parts: Mapping[str, torch.Tensor]) -> int:
    """Bytes of one safetensors message holding every tensor of ``parts`` (names must not collide)."""
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update({name: tensor.detach().contiguous() for name, tensor in part.items()})
    return len(save(merged))
