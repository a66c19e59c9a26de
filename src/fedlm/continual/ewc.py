"""Elastic weight consolidation on the adapter parameters, kept by each client.

EWC (Kirkpatrick et al. 2017, PNAS, Eq. 3) adds ``lambda / 2 * sum_i F_i (theta_i - theta*_{A,i})^2`` to the loss of a
new task B, with ``F`` the diagonal Fisher information of the old task A at its solution ``theta*_A``. Over a stream
of slices we use the online form (Schwarz et al. 2018, "Progress & Compress", Sec. 2.3; Huszar 2018): one running
Fisher ``F <- gamma * F + F_new`` and the newest anchor, so the cost does not grow with the number of slices.

Here the parameters are the trainable adapter tensors (LoRA factors, ...), the only ones that move. Each round a
client trains, it estimates the empirical diagonal Fisher ``mean_n (d loss_n / d theta)^2`` on ``samples`` of its
current examples (one example per backward pass) at its local solution, as the *pending* Fisher with that solution as
the pending anchor. The first round it trains on different slices, the pending pair is consolidated into its
penalty. Fisher and anchors stay with the client (``RUN_DIR/clients/<name>/state/``): nothing extra is uploaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlm.core.seeding import torch_generator
from fedlm.core.task import ClientContext, HookOutput, TrainerHook
from fedlm.core.update import TensorDict
from fedlm.models.adapters import named_trainable_parameters
from fedlm.objectives import Objective


def ewc_penalty(
    params: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], strength: float
) -> torch.Tensor:
    """``strength / 2 * sum_i F_i (theta_i - theta*_i)^2`` over the tensors named in ``fisher`` (Kirkpatrick et al.
    2017, Eq. 3), in float32; a tensor not in ``params`` (a LoRA factor frozen this round) adds nothing."""
    total = torch.zeros((), dtype=torch.float32)
    for name, f in fisher.items():
        if name not in params:
            continue
        p = params[name]
        diff = p.to(torch.float32) - anchor[name].to(device=p.device, dtype=torch.float32)
        total = total.to(p.device) + (f.to(p.device) * diff.pow(2)).sum()
    return 0.5 * strength * total


def consolidate(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], gamma: float) -> TensorDict:
    """Online EWC's running Fisher ``gamma * F_old + F_new`` (``old`` empty: ``F_new``)."""
    return {name: (gamma * old[name] + f) if name in old else f.clone() for name, f in new.items()}


def diagonal_fisher(model: torch.nn.Module, objective: Objective, examples: Sequence[Any], pad_id: int, device: torch.device) -> TensorDict:
    """The empirical diagonal Fisher ``mean_n g_n^2`` of the trainable tensors, ``g_n`` the gradient of example n's
    loss (one backward pass per example; tensors that do not train get zeros). The ``.grad`` fields are untouched."""
    named = named_trainable_parameters(model)
    live = {n: p for n, p in named.items() if p.requires_grad}
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in named.items()}
    for example in examples:
        batch = {k: v.to(device) for k, v in objective.collate([example], pad_id).items()}
        loss = objective.loss(model, batch)[0]
        grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
        for name, grad in zip(live, grads):
            if grad is not None:
                fisher[name].add_(grad.detach().to(torch.float32).pow(2), alpha=1.0 / len(examples))
    return {n: f.cpu() for n, f in fisher.items()}


@dataclass
class EWCState:
    """One client's EWC state: the consolidated Fisher and anchor, and the pending pair of the slices it last held."""

    fisher: TensorDict = field(default_factory=dict)
    anchor: TensorDict = field(default_factory=dict)
    pending_fisher: TensorDict = field(default_factory=dict)
    pending_anchor: TensorDict = field(default_factory=dict)
    pending_slices: tuple[int, ...] = ()

    def begin_slices(self, held: Sequence[int], gamma: float) -> None:
        """Before training on ``held``: if the pending pair is of other slices, consolidate it (online EWC)."""
        if self.pending_fisher and tuple(held) != self.pending_slices:
            self.fisher = consolidate(self.fisher, self.pending_fisher, gamma)
            self.anchor = dict(self.pending_anchor)
            self.pending_fisher, self.pending_anchor, self.pending_slices = {}, {}, ()

    def to_tensors(self) -> TensorDict:
        """The state as prefixed tensors, for the client's saved state."""
        out: TensorDict = {}
        for prefix, part in (
            ("fisher", self.fisher),
            ("anchor", self.anchor),
            ("pending_fisher", self.pending_fisher),
            ("pending_anchor", self.pending_anchor),
        ):
            out.update({f"ewc.{prefix}.{name}": t for name, t in part.items()})
        out["ewc.pending_slices"] = torch.tensor(self.pending_slices, dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, state: TensorDict | None) -> EWCState:
        """The state saved by :meth:`to_tensors` (an empty one without a saved state)."""
        if state is None or "ewc.pending_slices" not in state:
            return cls()
        parts: dict[str, TensorDict] = {"fisher": {}, "anchor": {}, "pending_fisher": {}, "pending_anchor": {}}
        for key, tensor in state.items():
            head, _, rest = key.partition(".")
            kind, _, name = rest.partition(".")
            if head == "ewc" and kind in parts:
                parts[kind][name] = tensor
        return cls(**parts, pending_slices=tuple(int(s) for s in state["ewc.pending_slices"].tolist()))


@dataclass
class EWCHook(TrainerHook):
    """The client side of EWC in the trainer: the penalty in every local step, the pending Fisher after the last.

    The continual runtime sets :attr:`client` (the client's state), :attr:`examples` (its current slices' examples)
    and :attr:`seed` before each client trains (:meth:`use`)."""

    model: torch.nn.Module
    objective: Objective
    pad_id: int
    device: torch.device
    strength: float
    samples: int
    client: EWCState | None = None
    examples: Sequence[Any] = ()
    held: tuple[int, ...] = ()
    seed: int = 0

    def use(self, client: EWCState, examples: Sequence[Any], held: Sequence[int], seed: int) -> None:
        """Train the next client with ``client``'s state on ``examples`` (its slices ``held``), seeded by ``seed``."""
        self.client, self.examples, self.held, self.seed = client, examples, tuple(held), seed

    def begin(self, context: ClientContext, global_params: Mapping[str, torch.Tensor]) -> None:
        if self.client is None:
            raise RuntimeError(f"the EWC hook got no state for client {context.client_id!r}; the continual runtime sets it")

    def extra_loss(self, params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if self.client is None or not self.client.fisher:
            return None
        return ewc_penalty(params, self.client.fisher, self.client.anchor, self.strength)

    def end(
        self,
        params: Mapping[str, torch.Tensor],
        global_params: Mapping[str, torch.Tensor],
        lrs: Sequence[float],
        start_gradient: Mapping[str, torch.Tensor] | None,
    ) -> HookOutput:
        """Estimate the pending Fisher on ``samples`` seeded examples at the local solution ``params``."""
        if self.client is not None and self.examples:
            count = min(self.samples, len(self.examples))
            picked = torch.randperm(len(self.examples), generator=torch_generator(self.seed))[:count].tolist()
            chosen = [self.examples[i] for i in sorted(picked)]
            self.client.pending_fisher = diagonal_fisher(self.model, self.objective, chosen, self.pad_id, self.device)
            self.client.pending_anchor = {name: t.detach().to(torch.float32).cpu().clone() for name, t in params.items()}
            self.client.pending_slices = self.held
        self.client = None
        return HookOutput()
