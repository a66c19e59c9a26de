"""``fedsa``: FedSA-LoRA (Guo et al. 2025, "Selective Aggregation for Low-Rank Adaptation in Federated Learning").

The A factors of LoRA learn what clients share and the B factors what is client-specific (their Sec. 3), so each
client trains both but uploads only A; the server aggregates A alone and every client keeps its own B. Here a
client's B is its personal state: the round starts from the global A with the client's B (its last saved one, or
the initial B before its first round), and the upload carries a zero delta for every B, so the server's B stays at
its initial value (zero for LoRA: the server's adapter alone is the base model). The personal model is the final
global A with the client's B.
"""

from __future__ import annotations

import dataclasses

import torch

from fedlm.core.task import ClientTask
from fedlm.core.update import ClientUpdate, TensorDict
from fedlm.personalization.base import PERSONALIZATION, PersonalMethod


def is_lora_b(name: str) -> bool:
    """A LoRA B factor (``...lora_B.weight``)."""
    return ".lora_B." in name


@PERSONALIZATION.register("fedsa")
class FedSA(PersonalMethod):
    """Share A, keep B on the client."""

    name = "fedsa"

    def prepare(self, client: str, task: ClientTask) -> ClientTask:
        own = self.side.store.latest(client, before=task.plan.round)
        if own is None:
            return task
        return dataclasses.replace(task, state={**task.state, **own})

    def after(self, client: str, task: ClientTask, update: ClientUpdate) -> ClientUpdate:
        # the client's B: its start plus its trained delta (what the trainer computed, in float32)
        own = {n: (task.state[n].to(torch.float32) + d).to(task.state[n].dtype) for n, d in update.tensors.items() if is_lora_b(n)}
        self.side.store.save(client, task.plan.round, own)
        tensors = {n: torch.zeros_like(d) if is_lora_b(n) else d for n, d in update.tensors.items()}
        return dataclasses.replace(update, tensors=tensors)

    def personal_state(self, client: str, global_state: TensorDict) -> TensorDict:
        own = self.side.store.latest(client) or {}
        return {**global_state, **own}
