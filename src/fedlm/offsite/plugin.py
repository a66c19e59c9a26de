"""Plugging an adapter trained on the emulator into the full model (Offsite-Tuning's "plug-in", Xiao et al. 2023,
Sec. 3.1: the adapters trained with the emulator are plugged into the full model unchanged).

The emulator names every kept layer by its full-model index (:mod:`fedlm.offsite.emulator`), so the adapter's names
are the full model's: the plug-in is a check that names and shapes match, then a plain load.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedlm.aggregation.lora_structure import is_residual
from fedlm.core.errors import FedlmError
from fedlm.models.adapters import load_trainable_state, named_trainable_parameters


def check_plug_in(full: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse an adapter state that does not fit ``full``'s trainable parameters, naming the first misfit (in the
    state's order): a name the full model lacks, a shape that differs, or a full-model tensor the state lacks."""
    expected = named_trainable_parameters(full)
    for name, tensor in state.items():
        if is_residual(name):  # a LoRA residual (fedex, flora) is checked by the module it belongs to
            continue
        if name not in expected:
            raise FedlmError(
                f"offsite plug-in: the emulator adapter's parameter {name!r} has no counterpart in the full model; "
                "adapters may only sit on the `offsite.n_bottom` and `offsite.n_top` layers"
            )
        want, got = tuple(expected[name].shape), tuple(tensor.shape)
        if want != got:
            raise FedlmError(f"offsite plug-in: the emulator adapter's parameter {name!r} has shape {got}, the full model's {want}")
    missing = [name for name in expected if name not in state]
    if missing:
        raise FedlmError(f"offsite plug-in: the emulator adapter lacks the full model's parameter {missing[0]!r}")


def plug_in(full: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load the emulator-trained adapter ``state`` into ``full`` after :func:`check_plug_in`."""
    check_plug_in(full, state)
    load_trainable_state(full, state)
