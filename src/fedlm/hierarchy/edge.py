"""An edge aggregator of HierFAVG: its clients' updates averaged for ``edge_rounds`` edge rounds, starting from the
cloud model, and the edge's model change sent up as one update.

Liu, Zhang, Song & Letaief 2020, "Client-Edge-Cloud Hierarchical Federated Learning" (ICC), Algorithm 1: every
kappa_1 local steps each edge l sets w^l <- sum_{i in C_l} (|D_i| / |D^l|) w_i (an edge aggregation, eq. 4), and every
kappa_2 edge aggregations the cloud sets w <- sum_l (|D^l| / |D|) w^l (eq. 5). Here kappa_1 is ``federation.local_steps``
and kappa_2 is ``hierarchy.edge_rounds``. With client deltas Delta_i relative to the edge model, edge round e is
w^l_e = w^l_{e-1} + sum_i p_i Delta_i (p_i = n_i / sum_{j in C_l} n_j, FedAvg's step); the edge uploads
W^l = sum_e sum_i p_i Delta_i, accumulated in float32 (it equals w^l_E - w in exact arithmetic, without the rounding of
the edge model's dtype), with weight |D^l|, the examples of its clients that sent an update. The cloud aggregates
these updates with the run's aggregator: FedAvg gives eq. 5, a server optimiser (FedAdam, ...) treats the edges'
mean change as its pseudo-gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedlm.aggregation.lora.mode import LoraMode
from fedlm.aggregation.weights import example_weights, weighted_sum
from fedlm.config.schema import ExperimentConfig
from fedlm.core.seeding import derive_seed
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientUpdate, TensorDict
from fedlm.federation.schedule import lr_at


def edge_mean_update(deltas: Sequence[Mapping[str, torch.Tensor]], num_examples: Sequence[int]) -> TensorDict:
    """sum_i p_i Delta_i, p_i = n_i / sum n: an edge aggregation (HierFAVG eq. 4 written on deltas), float32."""
    return weighted_sum(deltas, example_weights(num_examples))


def apply_update(params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> TensorDict:
    """params + delta, summed in float32 and stored in each parameter's dtype."""
    return {n: (params[n].to(torch.float32) + delta[n]).to(params[n].dtype) for n in params}


def edge_round_lrs(config: ExperimentConfig, round_num: int, edge_round: int, edge_rounds: int) -> list[float]:
    """Per-step learning rates of edge round ``edge_round`` of cloud round ``round_num`` (both 1-based) on the
    schedule over all local steps of the run (``rounds * edge_rounds * local_steps``); one edge round per cloud round
    gives :func:`fedlm.federation.tasks.round_lrs`."""
    fed = config.federation
    total = fed.rounds * edge_rounds * fed.local_steps
    first = ((round_num - 1) * edge_rounds + (edge_round - 1)) * fed.local_steps
    return [lr_at((first + s) / total, base_lr=fed.lr, schedule=fed.lr_schedule, min_lr_ratio=fed.min_lr_ratio) for s in range(fed.local_steps)]


def edge_round_task(task: ClientTask, config: ExperimentConfig, client: str, edge_round: int, edge_rounds: int) -> ClientTask:
    """The cloud round's task of ``client`` for edge round ``edge_round``: its learning rates on the run's schedule,
    and (after the first edge round, whose seed is the flat round's) a seed derived from the edge round too, so each
    edge round draws fresh batches."""
    plan = task.plan
    seed = plan.seed if edge_round == 1 else derive_seed(config.seed, "local", plan.round, client, "edge-round", edge_round)
    lrs = edge_round_lrs(config, plan.round, edge_round, edge_rounds)
    return dataclasses.replace(task, plan=dataclasses.replace(plan, lrs=lrs, seed=seed))


@dataclass
class Edge:
    """One edge aggregator during one cloud round: its model, and the change it will upload."""

    name: str
    cloud_state: TensorDict  # w, the cloud model the edge started from
    lora: LoraMode
    ranks: Mapping[str, int | None]
    state: TensorDict = field(default_factory=dict)  # w^l_e
    change: TensorDict = field(default_factory=dict)  # W^l = sum of the edge rounds' mean updates (float32)
    contributors: dict[str, int] = field(default_factory=dict)  # client -> n_i, clients with an accepted update

    def __post_init__(self) -> None:
        self.state = self.state or dict(self.cloud_state)

    def aggregate(self, tasks: Mapping[str, ClientTask], accepted: Sequence[ClientUpdate]) -> None:
        """One edge round: w^l_e = w^l_{e-1} + sum_i p_i Delta_i in the LoRA mode's space (unchanged without updates)."""
        if not accepted:
            return
        starts = {client: task.state for client, task in tasks.items()}
        space, updates = self.lora.to_server_space(self.state, accepted, starts, self.ranks)
        mean = edge_mean_update([u.tensors for u in updates], [u.num_examples for u in updates])
        self.state, _ = self.lora.from_server_space(apply_update(space, mean), self.state)
        self.change = {n: self.change[n] + mean[n] for n in mean} if self.change else mean
        self.contributors.update({u.client_id: u.num_examples for u in accepted})

    def update(self, round_num: int, losses: Sequence[float]) -> ClientUpdate | None:
        """What the edge uploads to the cloud: its change W^l with weight |D^l| (None when no client contributed)."""
        if not self.contributors:
            return None
        metrics = {"loss": sum(losses) / len(losses)} if losses else {}
        return ClientUpdate(self.name, round_num, sum(self.contributors.values()), self.change, metrics)
