"""Local training on one client: the same code in the simulation, the baselines and every runtime.

Optimizer state: each client starts every round with a fresh AdamW (Loshchilov & Hutter 2019); nothing but the
adapter tensors persists between rounds, as in FedAvg (McMahan et al. 2017) and OpenFedLLM. Batches and dropout
are seeded from (seed, round, client), so a round replays identically after a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from peft import PeftModel

from fedlm.aggregation.base import TrainerHook
from fedlm.data.collate import collate_for_loss
from fedlm.data.tokenize import TokenizedExample
from fedlm.federation.sampling import batch_indices
from fedlm.federation.update import ClientUpdate, TensorDict
from fedlm.models.adapters import load_trainable_state, named_trainable_parameters, trainable_state
from fedlm.seeding import seeded_torch


class NonFiniteLossError(RuntimeError):
    """A client's loss became NaN or Inf; its update is not sent."""


@dataclass(frozen=True)
class LocalPlan:
    """What the server asks of a client this round: one learning rate per optimizer step, batch size, seed."""

    round: int
    lrs: list[float]
    batch_size: int
    seed: int


@dataclass
class ClientTrainer:
    """Trains the shared adapter from the global state on one client's examples and returns the delta."""

    model: PeftModel
    pad_id: int
    device: torch.device
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    hooks: Sequence[TrainerHook] = field(default_factory=list)

    def train(
        self,
        client_id: str,
        examples: Sequence[TokenizedExample],
        global_state: Mapping[str, torch.Tensor],
        plan: LocalPlan,
        on_step: Callable[[], None] | None = None,
    ) -> ClientUpdate:
        """Run ``len(plan.lrs)`` optimizer steps (calling ``on_step`` after each); raise
        :class:`NonFiniteLossError` on a NaN/Inf loss."""
        load_trainable_state(self.model, global_state)
        named = named_trainable_parameters(self.model)
        optimizer = torch.optim.AdamW(list(named.values()), lr=plan.lrs[0], weight_decay=self.weight_decay)
        batches = batch_indices(len(examples), len(plan.lrs), plan.batch_size, plan.seed)
        losses: list[float] = []
        tokens = 0
        self.model.train()
        with seeded_torch(plan.seed):
            for step, (lr, batch_ids) in enumerate(zip(plan.lrs, batches)):
                batch = collate_for_loss([examples[i] for i in batch_ids], self.pad_id)
                loss = self._step(optimizer, named, global_state, batch, lr)
                if not torch.isfinite(torch.tensor(loss)):
                    raise NonFiniteLossError(
                        f"client {client_id!r} got a non-finite loss at round {plan.round} step {step + 1}; "
                        "lower `federation.lr`, keep `federation.max_grad_norm`, or use `model.dtype: float32`"
                    )
                losses.append(loss)
                tokens += int((batch["labels"] != -100).sum())
                if on_step is not None:
                    on_step()
        self.model.eval()
        delta = _difference(trainable_state(self.model), global_state)
        metrics = {"loss": sum(losses) / len(losses), "steps": float(len(losses)), "lr": plan.lrs[0], "tokens": float(tokens)}
        return ClientUpdate(client_id=client_id, round=plan.round, num_examples=len(examples), tensors=delta, metrics=metrics)

    def _step(
        self,
        optimizer: torch.optim.Optimizer,
        named: dict[str, torch.nn.Parameter],
        global_state: Mapping[str, torch.Tensor],
        batch: dict[str, torch.Tensor],
        lr: float,
    ) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = {k: v.to(self.device) for k, v in batch.items()}
        loss = self.model(**batch).loss  # token-mean cross-entropy over response tokens
        objective = loss
        for hook in self.hooks:
            extra = hook.extra_loss(named, global_state)
            if extra is not None:
                objective = objective + extra
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(named.values()), self.max_grad_norm)
        optimizer.step()
        return float(loss.detach())


def _difference(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> TensorDict:
    """new - old per name, in float32."""
    return {name: new[name].to(torch.float32) - old[name].to(torch.float32) for name in new}
