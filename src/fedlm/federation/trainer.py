"""Local training on one client: the same code in the simulation, the baselines and every runtime.

Optimizer state: each client starts every round with a fresh AdamW (Loshchilov & Hutter 2019) or plain SGD
(``federation.optimizer``); nothing but the adapter tensors (and an algorithm's client memory) persists between rounds, as in FedAvg (McMahan et al. 2017) and OpenFedLLM. Batches and dropout
are seeded from (seed, round, client), so a round replays identically after a resume.

With ``sample_dp`` set (``privacy.sample_dp``) every step is a DP-SGD step (Abadi et al. 2016, Algorithm 1; see
:mod:`fedlm.privacy.sample_dp`): Poisson lots instead of fixed-size batches, per-example clipping instead of
``max_grad_norm`` (which is then ignored), Gaussian noise; hooks see the privatised gradient.

The loss comes from the objective (``objective``, :mod:`fedlm.objectives`: sft, clm or dpo), which also batches the
examples; its metrics (e.g. DPO's reward margin) are averaged over the round's steps into the update's metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlm.aggregation.lora_structure import lora_role, mask_beyond_rank
from fedlm.core.sampling import batch_indices
from fedlm.core.seeding import seeded_torch
from fedlm.core.task import ClientContext, LocalPlan, NonFiniteLossError, TrainerHook
from fedlm.core.update import ClientUpdate, TensorDict
from fedlm.models.adapters import load_trainable_state, named_trainable_parameters
from fedlm.objectives import Objective, build_objective
from fedlm.privacy.sample_dp import Privatiser, SampleDP, poisson_batches


@dataclass
class ClientTrainer:
    """Trains the shared adapter from the global state on one client's examples and returns the delta."""

    model: torch.nn.Module  # a PeftModel, or the PreTrainedModel itself for `peft.method: full`
    pad_id: int
    device: torch.device
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    hooks: Sequence[TrainerHook] = field(default_factory=list)
    optimizer: str = "adamw"
    sample_dp: SampleDP | None = None
    objective: Objective = field(default_factory=lambda: build_objective("sft"))
    #: called after each backward: adds the other data-parallel processes' gradients (fedlm.federation.data_parallel)
    gradient_sum: Callable[[dict[str, torch.nn.Parameter]], None] | None = None

    def train(
        self,
        client_id: str,
        examples: Sequence[Any],  # the objective's examples
        global_state: Mapping[str, torch.Tensor],
        plan: LocalPlan,
        on_step: Callable[[], None] | None = None,
        context: ClientContext | None = None,
    ) -> ClientUpdate:
        """Run ``len(plan.lrs)`` optimizer steps from ``global_state`` (calling ``on_step`` after each) and return
        the delta; raise :class:`NonFiniteLossError` on a NaN/Inf loss. ``context`` carries the algorithm's
        extras and the client's memory for the hooks."""
        load_trainable_state(self.model, global_state)
        every = named_trainable_parameters(self.model)
        with frozen_factor(every, plan.frozen) as named:
            return self._train(client_id, examples, global_state, plan, named, every, on_step, context)

    def _train(
        self,
        client_id: str,
        examples: Sequence[Any],
        global_state: Mapping[str, torch.Tensor],
        plan: LocalPlan,
        named: dict[str, torch.nn.Parameter],
        every: dict[str, torch.nn.Parameter],
        on_step: Callable[[], None] | None,
        context: ClientContext | None,
    ) -> ClientUpdate:
        """:meth:`train` on the parameters ``named`` (``every`` trainable one but the plan's frozen factor)."""
        optimizer = self._optimizer(list(named.values()), plan.lrs[0])
        dp = self.sample_dp
        draw = poisson_batches if dp is not None else batch_indices
        batches = [[examples[i] for i in ids] for ids in draw(len(examples), len(plan.lrs), plan.batch_size, plan.seed)]
        for hook in self.hooks:
            hook.begin(context or ClientContext(client_id, plan.round), global_state)
        needs_start = any(h.needs_start_gradient for h in self.hooks)
        if needs_start and dp is not None:
            raise ValueError("DP-SGD (sample_dp) cannot run a hook that uploads the plain start gradient (SCAFFOLD option I)")
        start_gradient = self._start_gradient(named, batches, plan) if needs_start else None
        losses: list[float] = []
        step_metrics: list[dict[str, float]] = []
        tokens = 0
        self.model.train()
        private = dp.privatiser(self.model, plan.batch_size, len(examples), plan.seed) if dp is not None else nullcontext()
        with seeded_torch(plan.seed), private as privatiser:
            for step, (lr, batch_examples) in enumerate(zip(plan.lrs, batches)):
                batch = self.objective.collate(batch_examples, self.pad_id) if batch_examples else None  # a Poisson lot may be empty
                loss = self._step(optimizer, named, global_state, batch, lr, plan.rank, privatiser, step_metrics)
                if loss is not None and batch is not None:
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
        local = {name: param.detach().clone() for name, param in every.items()}  # trainable_state, the frozen factor too
        extras: TensorDict = {}
        memory: TensorDict = {}
        for hook in self.hooks:
            out = hook.end(local, global_state, plan.lrs, start_gradient)
            extras.update(out.extras)
            memory.update(out.memory)
        delta = _difference(local, global_state)
        mean_loss = sum(losses) / len(losses) if losses else float("nan")
        metrics = {"loss": mean_loss, "steps": float(len(plan.lrs)), "lr": plan.lrs[0], "tokens": float(tokens)}
        for key in dict.fromkeys(k for m in step_metrics for k in m):  # the objective's metrics, mean over steps
            values = [m[key] for m in step_metrics if key in m]
            metrics[key] = sum(values) / len(values)
        if dp is not None:
            metrics["sample_epsilon"] = dp.epsilon_spent(client_id, plan.round, len(plan.lrs), plan.batch_size, len(examples))
        return ClientUpdate(client_id, plan.round, len(examples), delta, metrics, extras, memory)

    def _optimizer(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """A fresh local optimizer: AdamW, or plain SGD (the local solver of FedAvg and SCAFFOLD's analysis)."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)

    def _start_gradient(self, named: dict[str, torch.nn.Parameter], batches: Sequence[Sequence[Any]], plan: LocalPlan) -> TensorDict:
        """Mean gradient of the loss at the starting point over the round's batches (SCAFFOLD option I)."""
        total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named.items()}
        self.model.train()
        with seeded_torch(plan.seed + 1):
            for batch_examples in batches:
                batch = {k: v.to(self.device) for k, v in self.objective.collate(batch_examples, self.pad_id).items()}
                self.model.zero_grad(set_to_none=True)
                self.objective.loss(self.model, batch)[0].backward()
                if self.gradient_sum is not None:
                    self.gradient_sum(named)
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
        batch: dict[str, torch.Tensor] | None,
        lr: float,
        rank: int | None,
        privatiser: Privatiser | None = None,
        step_metrics: list[dict[str, float]] | None = None,
    ) -> float | None:
        """One optimizer step; returns the loss (None for an empty DP-SGD lot) and appends the objective's metrics
        to ``step_metrics``. Under DP-SGD ``param.grad`` is the privatised gradient before the hooks'
        data-independent terms (FedProx) and corrections are added."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = {k: v.to(self.device) for k, v in batch.items()} if batch is not None else None
        optimizer.zero_grad(set_to_none=True)
        loss: torch.Tensor | float | None
        if privatiser is None:
            assert batch is not None  # noqa: S101 - fixed-size batches are never empty
            loss, extra_metrics = self.objective.loss(self.model, batch)  # sft/clm: token-mean cross-entropy
            if step_metrics is not None and extra_metrics:
                step_metrics.append(extra_metrics)
            objective: torch.Tensor | None = loss
        else:
            loss, objective = privatiser.backward(named, batch), None  # p.grad: clipped, summed, noised, / lot size
        for hook in self.hooks:
            extra = hook.extra_loss(named, global_state)
            if extra is not None:
                objective = extra if objective is None else objective + extra
        if objective is not None:
            objective.backward()
        if self.gradient_sum is not None:
            self.gradient_sum(named)
        if self.max_grad_norm is not None and privatiser is None:  # per-example clipping replaces it under DP-SGD
            torch.nn.utils.clip_grad_norm_(list(named.values()), self.max_grad_norm)
        for hook in self.hooks:
            hook.correct_gradients(named)
        if rank is not None:
            mask_beyond_rank(named, rank)  # a client of rank r_k trains only its first r_k components
        optimizer.step()
        return float(loss.detach()) if isinstance(loss, torch.Tensor) else loss


@contextmanager
def frozen_factor(named: dict[str, torch.nn.Parameter], factor: str | None) -> Iterator[dict[str, torch.nn.Parameter]]:
    """The parameters that train while the LoRA factor ``factor`` ("A", "B"; None: none) stays fixed (RoLoRA, Chen
    et al. 2025): the fixed ones get ``requires_grad`` False for the round, so backward, gradient clipping, DP-SGD's
    per-example gradients and the optimizer (weight decay included) all leave them exactly as downloaded."""
    fixed = [param for name, param in named.items() if factor is not None and lora_role(name) == factor and param.requires_grad]
    for param in fixed:
        param.requires_grad_(False)
    try:
        yield {name: param for name, param in named.items() if factor is None or lora_role(name) != factor}
    finally:
        for param in fixed:
            param.requires_grad_(True)


def _difference(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> TensorDict:
    """new - old per name, in float32."""
    return {name: new[name].to(torch.float32) - old[name].to(torch.float32) for name in new}
