"""The product space of the modes that fold into the frozen weight (``fedex``, ``flora``).

A module of such a state computes W0 + (alpha / r)(B A + R), R its frozen residual (``<module>.lora_residual``,
:mod:`fedlm.aggregation.lora_structure`). Its effective product is P = B A + R; a client changes only B and A, so
its change of P is (B + dB)(A + dA) - B A, the :class:`~fedlm.aggregation.lora.exact.ProductDelta` of FlexLoRA's
exact mode. :class:`ResidualProductMode` is what the two modes share: that space, and the mapping of the updates into it.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from fedlm.aggregation.lora.exact import PRODUCT_SUFFIX
from fedlm.aggregation.lora.mode import LoraMode
from fedlm.aggregation.lora_structure import RESIDUAL_SUFFIX, LoraPair, lora_pairs, without_residuals
from fedlm.core.update import ClientUpdate, TensorDict


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


class ResidualProductMode(LoraMode):
    """A mode whose aggregator works on the effective products P = B A + R and whose result is folded into the
    frozen residual R (``fedex``, ``flora``). The server space holds the non-LoRA tensors, with ``keeps_factors``
    the factors A and B too, all in float32, plus P per module; a client's update is mapped into it lazily by
    ``client_delta(start, delta)`` (its start without residuals)."""

    factor_space = False
    keeps_residual = True
    client_extra = "the frozen residual of every LoRA module"
    #: Whether the server space holds the factors A and B besides the products.
    keeps_factors: ClassVar[bool]

    def to_server_space(
        self,
        state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        starts: Mapping[str, Mapping[str, torch.Tensor]],
        ranks: Mapping[str, int | None],
    ) -> tuple[TensorDict, list[ClientUpdate]]:
        plain = without_residuals(state)
        kept = plain if self.keeps_factors else {name: plain[name] for name in lora_pairs(plain)[1]}
        space = {name: tensor.to(torch.float32) for name, tensor in kept.items()}
        space.update(effective_products(state))
        mapped = [dataclasses.replace(u, tensors=self.client_delta(without_residuals(starts[u.client_id]), u.tensors)) for u in updates]  # type: ignore[arg-type]  # lazy
        return space, mapped

    @abstractmethod
    def client_delta(self, start: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """A client's update in the server space, from its start (residuals left out) and its delta; read lazily."""

    @staticmethod
    def split_result(params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> tuple[list[LoraPair], TensorDict]:
        """The LoRA pairs of ``state`` and the aggregator's result for every other tensor, in the state's dtype."""
        pairs, others = lora_pairs(without_residuals(state))
        return pairs, {name: params[name].to(state[name].dtype) for name in others}
