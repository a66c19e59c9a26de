"""How LoRA tensors are named and paired, and how a LoRA state is cut to a smaller rank.

PEFT names a LoRA layer's factors ``<module>.lora_A.weight`` (A: (r, d_in)) and ``<module>.lora_B.weight``
(B: (d_out, r)); the module's update is Delta W = (alpha / r) B A (Hu et al. 2022, eq. 3). Every client uses the
global rank r for its tensor shapes and the global scale alpha / r; a client of rank r_k < r uses only the first
r_k components (rows of A, columns of B) and keeps the others at zero (HetLoRA, Cho et al. 2024, truncation).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedlm.core.update import TensorDict

_A, _B = ".lora_A.weight", ".lora_B.weight"
#: A module's dense residual R (d_out, d_in), unscaled: the module computes W0 + (alpha / r) (B A + R). Kept in the
#: global state by the LoRA modes that fold into the frozen weight (FedEx-LoRA, FLoRA); never trained or uploaded.
RESIDUAL_SUFFIX = ".lora_residual"


@dataclass(frozen=True)
class LoraPair:
    """The two factor names of one LoRA-adapted module."""

    module: str
    a: str
    b: str


def lora_role(name: str) -> str | None:
    """'A' or 'B' for a LoRA factor tensor name, None for anything else."""
    if name.endswith(_A):
        return "A"
    if name.endswith(_B):
        return "B"
    return None


def is_residual(name: str) -> bool:
    """Whether ``name`` is a module's frozen LoRA residual (see :data:`RESIDUAL_SUFFIX`)."""
    return name.endswith(RESIDUAL_SUFFIX)


def without_residuals(state: Mapping[str, torch.Tensor]) -> TensorDict:
    """``state`` without its residual tensors: the tensors clients train and upload."""
    return {name: tensor for name, tensor in state.items() if not is_residual(name)}


def lora_pairs(names: list[str] | Mapping[str, object]) -> tuple[list[LoraPair], list[str]]:
    """The (A, B) pairs among ``names`` (sorted by module) and the names that are not LoRA factors."""
    names = sorted(names)
    pairs: list[LoraPair] = []
    present = set(names)
    for name in names:
        if name.endswith(_A):
            module = name.removesuffix(_A)
            if module + _B in present:
                pairs.append(LoraPair(module, name, module + _B))
    paired = {p.a for p in pairs} | {p.b for p in pairs}
    return pairs, [n for n in names if n not in paired]


def rank_slice(name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """The first ``rank`` components of a LoRA factor (A: rows, B: columns); other tensors unchanged."""
    role = lora_role(name)
    if role == "A":
        return tensor[:rank]
    if role == "B":
        return tensor[:, :rank]
    return tensor


def truncate_to_rank(state: Mapping[str, torch.Tensor], rank: int | None) -> TensorDict:
    """``state`` with every LoRA component beyond ``rank`` set to zero (shapes kept); None keeps everything."""
    out: TensorDict = {}
    for name, tensor in state.items():
        role = lora_role(name)
        if rank is None or role is None or _components(name, tensor) <= rank:
            out[name] = tensor
            continue
        kept = tensor.clone()
        if role == "A":
            kept[rank:] = 0
        else:
            kept[:, rank:] = 0
        out[name] = kept
    return out


def wire_form(state: Mapping[str, torch.Tensor], rank: int | None) -> TensorDict:
    """What a client of rank ``rank`` actually sends or receives: LoRA factors cut to their first ``rank`` components."""
    if rank is None:
        return dict(state)
    return {name: rank_slice(name, tensor, rank).contiguous() for name, tensor in state.items()}


def pad_like(tensors: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> TensorDict:
    """Tensors cut to a rank, zero-padded back to the shapes of ``like`` (the inverse of :func:`wire_form`); a
    tensor ``like`` does not name, or of its shape already, is kept as it is."""
    out: TensorDict = {}
    for name, tensor in tensors.items():
        full = like.get(name)
        if full is None or tensor.shape == full.shape:
            out[name] = tensor
            continue
        padded = torch.zeros(full.shape, dtype=tensor.dtype)
        padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
        out[name] = padded
    return out


def mask_beyond_rank(params: Mapping[str, torch.nn.Parameter], rank: int) -> None:
    """Zero the gradients of LoRA components beyond ``rank`` in place (they stay exactly zero under AdamW)."""
    for name, param in params.items():
        if param.grad is None:
            continue
        role = lora_role(name)
        if role == "A":
            param.grad[rank:] = 0
        elif role == "B":
            param.grad[:, rank:] = 0


def component_coverage(ranks: list[int | None], weights: list[float], full_rank: int) -> torch.Tensor:
    """For each rank component j < full_rank, the total weight of the clients that train it (r_k > j).

    HetLoRA-style weighting (Cho et al. 2024): component j is averaged over the clients that have it, so a
    zero-padded client does not pull the components it lacks toward zero.
    """
    coverage = torch.zeros(full_rank, dtype=torch.float32)
    for rank, weight in zip(ranks, weights):
        coverage[: full_rank if rank is None else min(rank, full_rank)] += weight
    return coverage


def _components(name: str, tensor: torch.Tensor) -> int:
    return tensor.shape[0] if lora_role(name) == "A" else tensor.shape[1]
