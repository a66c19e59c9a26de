"""``ditto``: Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization").

Each client solves, beside the global objective, its personal one (their Eq. 2 and Algorithm 1):

    min_v  F_k(v) + lambda/2 ||v - w^t||^2

where w^t is the global adapter it received this round. Every time it is sampled, after its global update, the
client takes ``local_steps`` steps on v from its last v (the received w^t before its first round) with the
proximal term added to the loss. lambda = 0 is local training; a large lambda keeps v at w^t. v never leaves the
client. The global update is FedAvg's (or the configured aggregator's), unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlm.core.task import ClientContext, ClientTask, TrainerHook
from fedlm.core.update import ClientUpdate
from fedlm.personalization.base import PERSONALIZATION, PersonalMethod


class Proximal(TrainerHook):
    """lambda/2 ||v - anchor||^2 added to the loss (Ditto's personal objective; the anchor is the round's w^t)."""

    def __init__(self, lam: float, anchor: Mapping[str, torch.Tensor]) -> None:
        self.lam = lam
        self.anchor = anchor

    def begin(self, context: ClientContext, global_params: Mapping[str, torch.Tensor]) -> None:
        pass

    def extra_loss(self, params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if self.lam == 0.0:
            return None
        terms = [((p - self.anchor[n].to(device=p.device, dtype=p.dtype)) ** 2).sum() for n, p in params.items()]
        return 0.5 * self.lam * torch.stack(terms).sum()


@PERSONALIZATION.register("ditto")
class Ditto(PersonalMethod):
    """A personal adapter regularised towards the global one."""

    name = "ditto"

    def after(self, client: str, task: ClientTask, update: ClientUpdate) -> ClientUpdate:
        start = self.side.store.latest(client, before=task.plan.round) or dict(task.state)
        plan = self.side.plan(client, task.plan.round, "ditto", self.params.local_steps, self.params.lr, task.plan.rank)
        personal = self.side.train(client, start, plan, [Proximal(self.params.lam, task.state)])
        self.side.store.save(client, task.plan.round, personal)
        return update

    def describe(self) -> dict[str, object]:
        return {"lambda": self.params.lam}
