"""FedBiOT's between-rounds emulator alignment (Wu et al. 2024, "FedBiOT: LLM Local Fine-tuning in Federated Learning
without Full Model", KDD, Sec. 4.2): while the clients tune the adapter on the emulator, the server keeps the
emulator close to the full model. After every round it plugs the new global adapter into both models and takes
``offsite.align_steps`` distillation steps of the emulator's middle on its public text (the loss of
:mod:`fedlm.offsite.distill`); the next round's clients train on the re-aligned emulator.

A client that already holds the emulator then needs only its changed middle again: the bytes are counted by
:class:`fedlm.offsite.setup.EmulatorTraffic`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedlm.core.errors import FedlmError
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.seeding import derive_seed
from fedlm.core.update import TensorDict
from fedlm.models.adapters import load_trainable_state
from fedlm.offsite.distill import PublicText, distill_middle
from fedlm.offsite.layers import LayerPlan


@dataclass
class EmulatorAlignment(RoundObserver):
    """After each round: the emulator's middle distilled towards the full model's, the global adapter in both."""

    emulator: nn.Module
    full: nn.Module
    plan: LayerPlan
    public: PublicText
    steps: int
    lr: float
    seed: int
    device: torch.device
    on_aligned: Callable[[], None] = lambda: None  # tells the traffic count that the clients' emulator is stale

    def on_start(self, state: TensorDict, start_round: int) -> None:
        if start_round > 0:
            raise FedlmError(
                "--resume: `offsite.align_steps` > 0 changes the emulator every round and the checkpoints do not keep it; "
                "start a new `output_dir` (or resume a run with `offsite.align_steps: 0`)"
            )

    def on_round(self, record: RoundRecord) -> None:
        load_trainable_state(self.full, record.state)
        load_trainable_state(self.emulator, record.state)
        batches = self.public.batches(self.steps, derive_seed(self.seed, "offsite-align", record.round))
        result = distill_middle(self.emulator, self.full, self.plan, batches, self.lr, self.device)
        self.on_aligned()
        offsite = record.fields.setdefault("offsite", {})
        offsite.update({"align_loss_first": result.first, "align_loss_last": result.last, "align_steps": result.steps})
