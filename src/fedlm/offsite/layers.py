"""Which decoder layers an offsite-tuning emulator keeps (Xiao et al. 2023, Sec. 3.2: adapters on the bottom and top
layers, the middle compressed by uniform layer drop).

Pure index math on the number of layers, so that the config rules can judge a config at load when the model's depth
is known without loading it (:func:`known_num_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlm.core.errors import FedlmError
from fedlm.models.loading import SMOLLM2_ALIAS
from fedlm.models.tiny import tiny_num_layers

#: Decoder layers of the aliases whose depth fedlm knows without loading them (SmolLM2-135M has 30).
_KNOWN_DEPTHS = {SMOLLM2_ALIAS: 30}


@dataclass(frozen=True)
class LayerPlan:
    """The emulator's layers, by their index in the full model.

    Attributes:
        num_layers: Decoder layers of the full model.
        bottom: The bottom adapter layers ``0 .. n_bottom - 1``.
        middle: The middle layers the emulator keeps (uniformly chosen, ascending).
        top: The top adapter layers ``L - n_top .. L - 1``.
    """

    num_layers: int
    bottom: tuple[int, ...]
    middle: tuple[int, ...]
    top: tuple[int, ...]

    @property
    def kept(self) -> tuple[int, ...]:
        """Every layer the emulator holds, ascending: emulator position ``i`` is full-model layer ``kept[i]``."""
        return self.bottom + self.middle + self.top

    @property
    def adapter_layers(self) -> list[int]:
        """The layers that carry the adapters (bottom and top): the same in the emulator and the full model."""
        return list(self.bottom + self.top)

    @property
    def dropped(self) -> tuple[int, ...]:
        """The full model's middle layers the emulator leaves out (never sent to a client)."""
        return tuple(i for i in range(self.num_layers) if i not in self.kept)

    def full_index(self, position: int) -> int:
        """The full-model index of the emulator's layer at ``position`` (the name map emulator -> full)."""
        return self.kept[position]


def uniform_choice(count: int, keep: int) -> list[int]:
    """``keep`` of ``count`` positions spread evenly, the first and the last included when ``keep`` >= 2: position
    ``round(i (count - 1) / (keep - 1))`` with Python's round (halves to even), as ``uniform_choose_layers`` of
    Offsite-Tuning's reference code; ``keep`` = 1 (which that code cannot do) keeps the centre one."""
    if keep == 1:
        return [(count - 1) // 2]
    stride = (count - 1) / (keep - 1)
    return [round(i * stride) for i in range(keep)]


def plan_layers(num_layers: int, n_bottom: int, n_top: int, keep_ratio: float) -> LayerPlan:
    """The emulator of a ``num_layers``-layer model: ``n_bottom`` + ``n_top`` adapter layers around
    ``keep_ratio * M`` (halves rounded up) of the ``M`` middle layers.

    Raises:
        FedlmError: the adapter layers leave no middle, or ``keep_ratio`` keeps none of it (naming the field).
    """
    middle_count = num_layers - n_bottom - n_top
    if middle_count < 1:
        raise FedlmError(
            f"`offsite.n_bottom` ({n_bottom}) + `offsite.n_top` ({n_top}) leave no middle layer of the model's {num_layers}: "
            f"the emulator needs layers to compress; lower them to at most {num_layers - 1} together"
        )
    keep = int(keep_ratio * middle_count + 0.5)
    if keep < 1:
        raise FedlmError(f"`offsite.keep_ratio` {keep_ratio} keeps no middle layer of {middle_count}: raise it to at least {0.5 / middle_count:.3g}")
    middle = tuple(n_bottom + i for i in uniform_choice(middle_count, keep))
    return LayerPlan(num_layers, tuple(range(n_bottom)), middle, tuple(range(num_layers - n_top, num_layers)))


def known_num_layers(model_name: str) -> int | None:
    """The depth of ``model.name`` when fedlm knows it without loading the model (its aliases), else None."""
    return tiny_num_layers(model_name) or _KNOWN_DEPTHS.get(model_name)
