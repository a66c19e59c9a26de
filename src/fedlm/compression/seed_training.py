"""FedKSeed's client (a zeroth-order trainer) and the server's replay of its (seed, gradient) pairs around any
runtime (:mod:`fedlm.compression.fedkseed` for the algorithm)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlm.compression.fedkseed import GRADIENT, SEED_INDEX, as_float32, perturbation, replay, shifted, step
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.runtime import Runtime
from fedlm.core.sampling import batch_indices
from fedlm.core.seeding import derive_seed, seeded_torch, torch_generator
from fedlm.core.task import ClientContext, ClientTask, LocalPlan, NonFiniteLossError
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.federation.trainer import ClientTrainer
from fedlm.federation.wire import serialized_bytes
from fedlm.models.adapters import load_trainable_state


@dataclass
class ZerothOrderTrainer(ClientTrainer):
    """Local steps by two-point estimates along seeded perturbations (MeZO); uploads the (seed index, g) pairs.

    Runs no hooks, no DP-SGD, no optimizer state (the config rules refuse what would need them); the model is in
    eval mode (no dropout), so both probes of a step see the same function."""

    seeds: Sequence[int] = ()
    eps: float = 1e-3

    def train(
        self,
        client_id: str,
        examples: Sequence[Any],
        global_state: Mapping[str, torch.Tensor],
        plan: LocalPlan,
        on_step: Callable[[], None] | None = None,
        context: ClientContext | None = None,
    ) -> ClientUpdate:
        """``len(plan.lrs)`` zeroth-order steps from ``global_state``; the update's tensors are the pairs."""
        theta = {name: t.detach().to(torch.float32).cpu().clone() for name, t in global_state.items()}
        batches = [[examples[i] for i in ids] for ids in batch_indices(len(examples), len(plan.lrs), plan.batch_size, plan.seed)]
        chooser = torch_generator(derive_seed(plan.seed, "fedkseed-choice"))
        indices: list[int] = []
        grads: list[float] = []
        losses: list[float] = []
        tokens = 0
        self.model.eval()
        with torch.no_grad(), seeded_torch(plan.seed):
            for number, (lr, batch_examples) in enumerate(zip(plan.lrs, batches)):
                batch = {k: v.to(self.device) for k, v in self.objective.collate(batch_examples, self.pad_id).items()}
                index = int(torch.randint(len(self.seeds), (1,), generator=chooser))
                z = perturbation(self.seeds[index], theta)
                plus, minus = (self._loss(shifted(theta, z, sign * self.eps), batch) for sign in (1.0, -1.0))
                if not (torch.isfinite(torch.tensor(plus)) and torch.isfinite(torch.tensor(minus))):
                    raise NonFiniteLossError(
                        f"client {client_id!r} got a non-finite loss at round {plan.round} step {number + 1}; lower `federation.fedkseed.eps`"
                    )
                g = as_float32((plus - minus) / (2 * self.eps))
                theta = step(theta, z, lr * g)
                indices.append(index)
                grads.append(g)
                losses.append((plus + minus) / 2)
                tokens += int((batch["labels"] != -100).sum())
                if on_step is not None:
                    on_step()
        load_trainable_state(self.model, theta)
        message = {SEED_INDEX: torch.tensor(indices, dtype=torch.int16), GRADIENT: torch.tensor(grads, dtype=torch.float32)}
        metrics = {"loss": sum(losses) / len(losses), "steps": float(len(plan.lrs)), "lr": plan.lrs[0], "tokens": float(tokens)}
        return ClientUpdate(client_id, plan.round, len(examples), message, metrics)

    def _loss(self, theta: Mapping[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> float:
        load_trainable_state(self.model, theta)
        return float(self.objective.loss(self.model, batch)[0])


def replay_problem(update: ClientUpdate, steps: int, k: int) -> str | None:
    """Why the pairs of ``update`` cannot be replayed, or None."""
    if set(update.tensors) != {SEED_INDEX, GRADIENT}:
        return f"a FedKSeed update holds exactly {SEED_INDEX!r} and {GRADIENT!r}, got {sorted(update.tensors)[:3]}"
    index, grad = update.tensors[SEED_INDEX], update.tensors[GRADIENT]
    if index.dtype != torch.int16 or tuple(index.shape) != (steps,) or grad.dtype != torch.float32 or tuple(grad.shape) != (steps,):
        return f"a FedKSeed update holds {steps} int16 seed indices and {steps} float32 gradients"
    if steps and (int(index.min()) < 0 or int(index.max()) >= k):
        return f"a seed index is outside the pool of {k} candidate seeds"
    if not bool(torch.isfinite(grad).all()):
        return "a projected gradient is NaN or Inf"
    return None


@dataclass
class SeedReplay(RoundObserver):
    """Runs ``inner`` and replays each client's pairs into its dense delta before validation; as a round observer
    (after the traffic meter) it puts the pairs' message length in ``upload_bytes``."""

    inner: Runtime
    seeds: Sequence[int]
    sizes: dict[tuple[int, str], int] = field(default_factory=dict)

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> Sequence[ClientUpdate | ClientFailure]:
        """Train, count and replay each client's update."""
        results: list[ClientUpdate | ClientFailure] = []
        for result in self.inner.train_clients(tasks):
            task = tasks.get(result.client_id)
            if isinstance(result, ClientFailure) or task is None:
                results.append(result)
                continue
            self.sizes[(result.round, result.client_id)] = serialized_bytes(result.tensors)
            problem = replay_problem(result, len(task.plan.lrs), len(self.seeds))
            if problem is not None:
                results.append(ClientFailure(result.client_id, result.round, f"rejected: {problem}"))
                continue
            indices = [int(i) for i in result.tensors[SEED_INDEX]]
            grads = [float(g) for g in result.tensors[GRADIENT]]
            local = replay(task.state, self.seeds, indices, grads, task.plan.lrs)
            delta = {name: local[name] - task.state[name].to(torch.float32).cpu() for name in local}
            results.append(dataclasses.replace(result, tensors=delta))
        return results

    def on_round(self, record: RoundRecord) -> None:
        for client, row in record.traffic.items():
            size = self.sizes.pop((record.round, client), None)
            if size is not None:
                row["dense_upload_bytes"] = row["upload_bytes"]
                row["upload_bytes"] = size
        self.sizes = {key: size for key, size in self.sizes.items() if key[0] > record.round}
