"""Malicious clients in the simulation: who they are, what they do to their data or updates, and how many of them
a round can hold (the rules on that share live in :mod:`fedlm.config.rules`).

The attackers are ``attack.clients``, or round(``attack.fraction`` * number of clients) of them drawn with the
config seed. A ``data`` attack rewrites the attackers' training records before tokenization; an ``update`` attack
wraps the runtime (:class:`AttackedRuntime`) and replaces each attacker's delta after local training, seeing the
honest deltas of the round where the attack is omniscient (ALIE, IPM). Attacks wrap, never mutate.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedlm.attacks import AttackSpec, attack_spec, build_attack_params
from fedlm.attacks.model_poisoning import AttackParams, scaling
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.core.runtime import Runtime
from fedlm.core.seeding import derive_seed, torch_generator
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate, TensorDict

Record = dict[str, Any]


def attacker_count(fraction: float, num_clients: int) -> int:
    """round(fraction * n), at least 1."""
    return max(1, round(fraction * num_clients))


def worst_round_attackers(config: ExperimentConfig, num_clients: int) -> tuple[int, int]:
    """(updates per round K, the most attackers one round can hold) for a federation of ``num_clients``."""
    per_round = config.federation.clients_per_round or num_clients
    attack = config.attack
    total = len(attack.clients) if attack.clients is not None else attacker_count(attack.fraction or 0.0, num_clients)
    return per_round, min(total, per_round)


def choose_attackers(config: ExperimentConfig, client_names: Sequence[str]) -> list[str]:
    """The malicious clients: ``attack.clients`` (checked against the federation) or a seeded draw."""
    attack = config.attack
    if attack.clients is not None:
        unknown = sorted(set(attack.clients) - set(client_names))
        if unknown:
            raise FedlmError(f"`attack.clients` names unknown clients {unknown}; the clients are {list(client_names)}")
        return sorted(attack.clients)
    count = attacker_count(attack.fraction or 0.0, len(client_names))
    return sorted(random.Random(derive_seed(config.seed, "attackers")).sample(list(client_names), count))


@dataclass(frozen=True)
class AttackPlan:
    """The attack of a run: its spec, validated parameters, attackers and seed."""

    spec: AttackSpec
    params: AttackParams
    attackers: frozenset[str]
    seed: int

    def poison_records(self, client: str, records: list[Record]) -> list[Record]:
        """An attacker's training records after a data attack (other clients' records as they are)."""
        if self.spec.kind != "data" or client not in self.attackers:
            return records
        params = self.params.model_dump(exclude={"boost", "local_steps"})
        return self.spec.fn(records, seed=derive_seed(self.seed, "attack-data", client), **params)

    def attacker_task(self, client: str, task: ClientTask) -> ClientTask:
        """The task as the client runs it: an attacker of a data attack with ``local_steps`` trains that many steps
        (extra steps at the round's last learning rate); every other task as it is."""
        steps = getattr(self.params, "local_steps", None)
        if steps is None or client not in self.attackers:
            return task
        lrs = task.plan.lrs[:steps] + [task.plan.lrs[-1]] * max(0, steps - len(task.plan.lrs))
        return dataclasses.replace(task, plan=dataclasses.replace(task.plan, lrs=lrs))

    def needs_runtime(self) -> bool:
        """Whether the attack acts on the runtime (an update attack, a boost, or attackers' own local steps)."""
        return self.spec.kind == "update" or getattr(self.params, "boost", 1.0) != 1.0 or getattr(self.params, "local_steps", None) is not None

    def poison_updates(self, round_num: int, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
        """The round's updates with every attacker's delta replaced by the update attack's (or, for a data attack
        with ``boost`` != 1, multiplied by it: model replacement of the poisoned update)."""
        if self.spec.kind != "update":
            boost = getattr(self.params, "boost", 1.0)
            if boost == 1.0:
                return list(updates)
            return [
                dataclasses.replace(u, tensors=scaling(u.tensors, boost), metrics={**u.metrics, "malicious": 1.0})
                if u.client_id in self.attackers
                else u
                for u in updates
            ]
        honest = [u.tensors for u in updates if u.client_id not in self.attackers]
        bad = [u for u in updates if u.client_id in self.attackers]
        out = []
        for update in updates:
            if update.client_id in self.attackers:
                tensors = self._attack(round_num, update, honest, len(updates), len(bad))
                update = dataclasses.replace(update, tensors=tensors, metrics={**update.metrics, "malicious": 1.0})
            out.append(update)
        return out

    def _attack(self, round_num: int, update: ClientUpdate, honest: list[TensorDict], n: int, f: int) -> TensorDict:
        params = self.params.model_dump()
        name = self.spec.name
        if name == "gaussian_noise":
            return self.spec.fn(
                update.tensors, generator=torch_generator(derive_seed(self.seed, "attack-noise", round_num, update.client_id)), **params
            )
        if name == "alie":
            n_assumed, f_assumed = params.pop("num_clients") or n, params.pop("num_malicious") or f
            return self.spec.fn(honest, n_assumed, f_assumed, **params)
        if self.spec.omniscient:
            return self.spec.fn(honest, **params)
        return self.spec.fn(update.tensors, **params)


def build_attack_plan(config: ExperimentConfig, client_names: Sequence[str]) -> AttackPlan | None:
    """The run's attack plan, or None without ``attack.name`` (the attacker share is judged by the config rules,
    :func:`fedlm.config.rules.check_federation`)."""
    if config.attack.name is None:
        return None
    spec = attack_spec(config.attack.name)
    params = build_attack_params(config.attack.name, config.attack.params())
    return AttackPlan(spec, params, frozenset(choose_attackers(config, client_names)), config.seed)


def record_poisoner(config: ExperimentConfig) -> Callable[[list[str], str, list[Record]], list[Record]] | None:
    """The data-poisoning transform for :func:`fedlm.data.prepare.prepare_federated_data`, or None."""
    if config.attack.name is None or attack_spec(config.attack.name).kind != "data":
        return None

    def poison(client_names: list[str], client: str, records: list[Record]) -> list[Record]:
        plan = build_attack_plan(config, client_names)
        return plan.poison_records(client, records) if plan is not None else records

    return poison


@dataclass
class AttackedRuntime:
    """A runtime whose attackers train their own way (``local_steps``) and replace their deltas after training
    (model poisoning, boost)."""

    inner: Runtime
    plan: AttackPlan

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> list[ClientUpdate | ClientFailure]:
        results = list(self.inner.train_clients({c: self.plan.attacker_task(c, t) for c, t in tasks.items()}))
        updates = [r for r in results if isinstance(r, ClientUpdate)]
        round_num = next(iter(tasks.values())).plan.round if tasks else 0
        poisoned = iter(self.plan.poison_updates(round_num, updates))
        return [next(poisoned) if isinstance(r, ClientUpdate) else r for r in results]
