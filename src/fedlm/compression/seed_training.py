"""FedKSeed's client (a zeroth-order trainer) and the server's replay of its (seed, gradient) pairs around any
runtime (:mod:`fedlm.compression.fedkseed` for the algorithm)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlm.aggregation.weights import example_weights
from fedlm.compression.catch_up import forget_failed, forget_on_start, sync_tasks
from fedlm.compression.downlink import DownlinkState
from fedlm.compression.fedkseed import COEFFICIENT, GRADIENT, SEED_INDEX, as_float32, perturbation, replay, seedwise_step, shifted, step
from fedlm.compression.traffic import record_sizes
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.runtime import Runtime
from fedlm.core.sampling import batch_indices
from fedlm.core.seeding import derive_seed, seeded_torch, torch_generator
from fedlm.core.task import ClientContext, ClientTask, LocalPlan, NonFiniteLossError
from fedlm.core.update import ClientFailure, ClientUpdate, TensorDict
from fedlm.federation.aggregation_step import AggregateOutcome
from fedlm.federation.tasks import TaskBuilder
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
    pairs: dict[tuple[int, str], tuple[list[int], list[float], list[float]]] = field(default_factory=dict)  # (indices, g, lrs)

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
            self.pairs[(result.round, result.client_id)] = (indices, grads, list(task.plan.lrs))
            local = replay(task.state, self.seeds, indices, grads, task.plan.lrs)
            delta = {name: local[name] - task.state[name].to(torch.float32).cpu() for name in local}
            results.append(dataclasses.replace(result, tensors=delta))
        return results

    def on_round(self, record: RoundRecord) -> None:
        self.sizes = record_sizes(record, self.sizes, "upload")
        self.pairs = {key: pair for key, pair in self.pairs.items() if key[0] > record.round}


@dataclass
class SeedwiseFedAvg:
    """FedKSeed's server step (Qin et al. 2024, Algorithm 1): FedAvg of the clients' updates written per seed,

        c_s = sum_i p_i sum_{t: s_t = s} lr_t g_{i,t},        w <- w - sum_s c_s z_s,      p_i = n_i / n,

    applied seed by seed from the float32-rounded c_s (:func:`~fedlm.compression.fedkseed.seedwise_step`), so that
    the broadcast (seed index, c_s) list rebuilds the new global model on every client bit for bit. Equal to FedAvg of
    the replayed deltas up to float rounding. Its message sizes go to ``downlink`` (for :class:`SeedDownlink`)."""

    replay: SeedReplay
    min_clients: int
    downlink: DownlinkState
    last_message: TensorDict = field(default_factory=dict)  # the latest broadcast list

    def aggregate(self, state: TensorDict, tasks: Mapping[str, ClientTask], accepted: Sequence[ClientUpdate], round_num: int) -> AggregateOutcome:
        """The next global state from the accepted clients' pairs (skipped below ``min_clients`` updates)."""
        if len(accepted) < self.min_clients:
            return AggregateOutcome(state, True, {})
        ordered = sorted(accepted, key=lambda u: u.client_id)
        coefficients: dict[int, float] = {}
        for update, weight in zip(ordered, example_weights([u.num_examples for u in ordered])):
            indices, grads, lrs = self.replay.pairs[(round_num, update.client_id)]
            for index, g, lr in zip(indices, grads, lrs):
                coefficients[index] = coefficients.get(index, 0.0) + weight * lr * g
        indices = sorted(coefficients)
        message = {
            SEED_INDEX: torch.tensor(indices, dtype=torch.int16),
            COEFFICIENT: torch.tensor([coefficients[i] for i in indices], dtype=torch.float32),
        }
        new = seedwise_step(state, self.replay.seeds, indices, [float(c) for c in message[COEFFICIENT]])
        self.downlink.message_bytes[round_num] = serialized_bytes(message)
        if self.downlink.keep_messages:
            self.downlink.messages[round_num] = message
        self.last_message = message
        return AggregateOutcome(
            new, False, {"num_updates": float(len(accepted)), "seed_message_bytes": float(self.downlink.message_bytes[round_num])}
        )


@dataclass
class SeedDownlink(TaskBuilder, RoundObserver):
    """The task builder when the server broadcasts (seed index, c_s) lists: a client downloads the lists of the rounds
    since it last synced (or the dense model, if smaller), which rebuild the global state exactly; as a round observer
    it puts that size in ``download_bytes``."""

    downlink: DownlinkState | None = None
    sent: dict[tuple[int, str], int] = field(default_factory=dict)

    def build(self, state: TensorDict, chosen: Sequence[str], round_num: int) -> dict[str, ClientTask]:
        """Every chosen client's task from the global state; its download is the lists it misses."""
        if self.downlink is None:
            raise ValueError("SeedDownlink needs its state")
        # down.synced: the rounds whose lists a client has applied (0: the initial adapter)
        return sync_tasks(super().build(state, chosen, round_num), self.downlink, "seeds", round_num - 1, self.sent)

    def on_start(self, state: TensorDict, start_round: int) -> None:
        forget_on_start(self.downlink)

    def on_round(self, record: RoundRecord) -> None:
        forget_failed(self.downlink, record)
        self.sent = record_sizes(record, self.sent, "download")
