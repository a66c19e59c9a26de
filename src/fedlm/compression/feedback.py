"""Error feedback: what a compressor dropped is kept by the client and added to its next update.

Stich, Cordonnier & Jaggi 2018 ("Sparsified SGD with Memory", Algorithm 1) and Karimireddy, Rebjock, Stich & Jaggi
2019 ("Error Feedback Fixes SignSGD and other Gradient Compression Schemes", Algorithm 2, EF-SGD): with residual
e_t (e_0 = 0) the client sends C(Delta_t + e_t) and keeps

    e_{t+1} = Delta_t + e_t - C(Delta_t + e_t),

so the sum of what was sent over rounds plus the last residual equals the sum of the true updates.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlm.aggregation.lora_structure import pad_like, wire_form
from fedlm.compression.codec import Codec, shapes_of
from fedlm.core.update import TensorDict

#: The client-memory prefix of the residual (kept on the node over Flower, in the server's residual store in the
#: simulation).
RESIDUAL = "compression.residual."


def compress(
    codec: Codec, delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor], rank: int | None, generator: torch.Generator
) -> tuple[TensorDict, TensorDict, TensorDict]:
    """(message, what the server decodes padded to full shape, new residual) of ``delta`` plus ``residual``.

    The tensors are cut to the client's LoRA ``rank`` before encoding (the components beyond it are zero). Without
    error feedback the residual is empty and ``residual`` must be too."""
    target = {n: delta[n].to(torch.float32) + residual[n] if n in residual else delta[n].to(torch.float32) for n in delta}
    wire = wire_form(target, rank)
    message = codec.encode(wire, generator)
    sent = pad_like(codec.decode(message, shapes_of(wire)), target)
    new_residual = {n: target[n] - sent[n] for n in target} if codec.error_feedback else {}
    return message, sent, new_residual


def residual_of(memory: Mapping[str, torch.Tensor]) -> TensorDict:
    """The residual part of a client's memory (names without the prefix)."""
    return {k.removeprefix(RESIDUAL): t for k, t in memory.items() if k.startswith(RESIDUAL)}


def as_memory(residual: Mapping[str, torch.Tensor]) -> TensorDict:
    """A residual as client-memory entries."""
    return {RESIDUAL + k: t for k, t in residual.items()}
