"""The product space of the modes that fold into the frozen weight (``fedex``, ``flora``).

A module of such a state computes W0 + (alpha / r)(B A + R), R its frozen residual (``<module>.lora_residual``,
:mod:`fedlm.aggregation.lora_structure`). Its effective product is P = B A + R; a client changes only B and A, so
its change of P is (B + dB)(A + dA) - B A, the :class:`~fedlm.aggregation.lora.exact.ProductDelta` of FlexLoRA's
exact mode.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlm.aggregation.lora.exact import PRODUCT_SUFFIX
from fedlm.aggregation.lora_structure import RESIDUAL_SUFFIX, lora_pairs, without_residuals
from fedlm.core.update import TensorDict


def effective_products(state: Mapping[str, torch.Tensor]) -> TensorDict:
    """P = B A + R per LoRA module (``<module>.lora_product``, float32; R = 0 where the state has none)."""
    pairs, _ = lora_pairs(without_residuals(state))
    out: TensorDict = {}
    for pair in pairs:
        product = state[pair.b].to(torch.float32) @ state[pair.a].to(torch.float32)  # (d_out, d_in)
        residual = state.get(pair.module + RESIDUAL_SUFFIX)
        out[pair.module + PRODUCT_SUFFIX] = product if residual is None else product + residual.to(torch.float32)
    return out


def relative_norm(part_sq: float, whole_sq: float) -> float:
    """sqrt(part / whole), 0 when the whole is 0."""
    return (part_sq / whole_sq) ** 0.5 if whole_sq > 0 else 0.0
