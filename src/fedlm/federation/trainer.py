"""Local training on one client: the same code in the simulation, the baselines and every runtime.

Optimizer state: each client starts every round with a fresh AdamW (Loshchilov & Hutter 2019) or plain SGD
(``federation.optimizer``); nothing but the adapter tensors (and an algorithm's client memory) persists between rounds, as in FedAvg (McMahan et al. 2017) and OpenFedLLM. Batches and dropout
are seeded from (seed, round, client), so a round replays identically after a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from peft import PeftModel

from fedlm.aggregation.base import ClientContext, TrainerHook
from fedlm.aggregation.lora.structure import mask_beyond_rank
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
    """What the server asks of a client this round: one learning rate per optimizer step, batch size, seed,
    and the client's LoRA rank (None: the global rank; components beyond it stay zero)."""

    round: int
    lrs: list[float]
    batch_size: int
    seed: int
    rank: int | None = None


@dataclass(frozen=True)
class ClientTask:
    """Everything a client receives for a round: the plan, the adapter state to start from, algorithm extras."""

    plan: LocalPlan
    state: Mapping[str, torch.Tensor]
    context: ClientContext


@dataclass
class ClientTrainer:
    """Trains the shared adapter from the global state on one client's examples and returns the delta."""

    model: PeftModel
    pad_id: int
    device: torch.device
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    hooks: Sequence[TrainerHook] = field(default_factory=list)
    optimizer: str = "adamw"

    def train(
        self,
        client_id: str,
        examples: Sequence[TokenizedExample],
        global_state: Mapping[str, torch.Tensor],
        plan: LocalPlan,
        on_step: Callable[[], None] | None = None,
        context: ClientContext | None = None,
    ) -> ClientUpdate:
        """Run ``len(plan.lrs)`` optimizer steps from ``global_state`` (calling ``on_step`` after each) and return
        the delta; raise :class:`NonFiniteLossError` on a NaN/Inf loss. ``context`` carries the algorithm's
        extras and the client's memory for the hooks."""
        load_trainable_state(self.model, global_state)
        named = named_trainable_parameters(self.model)
        optimizer = self._optimizer(list(named.values()), plan.lrs[0])
        batches = [[examples[i] for i in ids] for ids in batch_indices(len(examples), len(plan.lrs), plan.batch_size, plan.seed)]
        for hook in self.hooks:
            hook.begin(context or ClientContext(client_id, plan.round), global_state)
        start_gradient = self._start_gradient(named, batches, plan) if any(h.needs_start_gradient for h in self.hooks) else None
        losses: list[float] = []
        tokens = 0
        self.model.train()
        with seeded_torch(plan.seed):
            for step, (lr, batch_examples) in enumerate(zip(plan.lrs, batches)):
                batch = collate_for_loss(batch_examples, self.pad_id)
                loss = self._step(optimizer, named, global_state, batch, lr, plan.rank)
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
        local = trainable_state(self.model)
        extras: TensorDict = {}
        memory: TensorDict = {}
        for hook in self.hooks:
            out = hook.end(local, global_state, plan.lrs, start_gradient)
            extras.update(out.extras)
            memory.update(out.memory)
        delta = _difference(local, global_state)
        metrics = {"loss": sum(losses) / len(losses), "steps": float(len(losses)), "lr": plan.lrs[0], "tokens": float(tokens)}
        return ClientUpdate(client_id, plan.round, len(examples), delta, metrics, extras, memory)

    def _optimizer(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """A fresh local optimizer: AdamW, or plain SGD (the local solver of FedAvg and SCAFFOLD's analysis)."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)

    def _start_gradient(
        self, named: dict[str, torch.nn.Parameter], batches: Sequence[Sequence[TokenizedExample]], plan: LocalPlan
    ) -> TensorDict:
        """Mean gradient of the loss at the starting point over the round's batches (SCAFFOLD option I)."""
        total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named.items()}
        self.model.train()
        with seeded_torch(plan.seed + 1):
            for batch_examples in batches:
                batch = {k: v.to(self.device) for k, v in collate_for_loss(batch_examples, self.pad_id).items()}
                self.model.zero_grad(set_to_none=True)
                self.model(**batch).loss.backward()
                if plan.rank is not None:
                    mask_beyond_rank(named, plan.rank)
                for name, p in named.items():
                    if p.grad is not None:
                        total[name].add_(p.grad.to(torch.float32), alpha=1.0 / len(batches))
        self.model.zero_grad(set_to_none=True)
        return total

    def _step(
        self,
        optimizer: torch.optim.Optimizer,
        named: dict[str, torch.nn.Parameter],
        global_state: Mapping[str, torch.Tensor],
        batch: dict[str, torch.Tensor],
        lr: float,
        rank: int | None,
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
        for hook in self.hooks:
            hook.correct_gradients(named)
        if rank is not None:
            mask_beyond_rank(named, rank)  # a client of rank r_k trains only its first r_k components
        optimizer.step()
        return float(loss.detach())


def _difference(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> TensorDict:
    """new - old per name, in float32."""
    return {name: new[name].to(torch.float32) - old[name].to(torch.float32) for name in new}
