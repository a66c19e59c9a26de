"""The contract of a personalization method and the registry that names them (``personalization.method``).

A method acts on the client side only. In each round it may change what the client starts from
(:meth:`PersonalMethod.prepare`, e.g. FedSA-LoRA's own B) and what it uploads or keeps
(:meth:`PersonalMethod.after`, e.g. Ditto's personal adapter trained beside the global update); after the last
round it gives each client's personal adapter (:meth:`PersonalMethod.personal_state`). Whatever a client keeps
goes to its :class:`~fedlm.personalization.store.ClientStore` folder, never to the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlm.config.schema import ExperimentConfig
from fedlm.core.registry import Registry
from fedlm.core.seeding import derive_seed
from fedlm.core.task import ClientTask, LocalPlan, TrainerHook
from fedlm.core.update import ClientUpdate, TensorDict
from fedlm.federation.trainer import ClientTrainer
from fedlm.models.adapters import trainable_state
from fedlm.personalization.store import ClientStore


@dataclass
class ClientSide:
    """What a method may use on a simulated client: a trainer on the shared model (no DP-SGD and no aggregator
    hooks: a personal part never leaves the client), each client's training examples and its store."""

    config: ExperimentConfig
    trainer: ClientTrainer
    client_train: Mapping[str, Sequence[Any]]
    store: ClientStore

    def plan(self, client: str, round_num: int, tag: str, steps: int | None, lr: float | None, rank: int | None = None) -> LocalPlan:
        """A personal plan: ``steps`` (default ``federation.local_steps``) at a constant ``lr`` (default
        ``federation.lr``), seeded from (seed, tag, round, client)."""
        fed = self.config.federation
        n = fed.local_steps if steps is None else steps
        seed = derive_seed(self.config.seed, "personal", tag, round_num, client)
        return LocalPlan(round_num, [fed.lr if lr is None else lr] * n, fed.batch_size, seed, rank)

    def train(self, client: str, start: Mapping[str, Any], plan: LocalPlan, hooks: Sequence[TrainerHook] = ()) -> TensorDict:
        """Train from ``start`` on the client's own examples; returns the local parameters bit for bit."""
        if not plan.lrs:  # no steps: the start, unchanged
            return {name: tensor.clone() for name, tensor in start.items()}
        trainer = dataclasses.replace(self.trainer, hooks=list(hooks)) if hooks else self.trainer
        trainer.train(client, self.client_train[client], start, plan)
        return self.trainer_state()

    def trainer_state(self) -> TensorDict:
        """The trainable tensors the shared model holds now (after a client's training: its local parameters)."""
        return trainable_state(self.trainer.model)


class PersonalMethod:
    """A personalization method; every default leaves the federation unchanged."""

    #: how inference uses the personal adapter: ``replace`` the global one, or combine with it (``dual``)
    combine: str = "replace"
    name: str = ""

    def __init__(self, params: Any, side: ClientSide) -> None:
        self.params = params
        self.side = side

    def prepare(self, client: str, task: ClientTask) -> ClientTask:
        """What the client starts the round from (default: the task as sent)."""
        return task

    def after(self, client: str, task: ClientTask, update: ClientUpdate) -> ClientUpdate:
        """The client's answer after its round (default: as trained); may train and keep personal state."""
        return update

    def around(self, client: str, task: ClientTask) -> AbstractContextManager[Any]:
        """What surrounds the client's own training this round (default: nothing; a soft prompt in front)."""
        return nullcontext()

    def personal_state(self, client: str, global_state: TensorDict) -> TensorDict:
        """The client's personal adapter after the last round (``dual``: its local adapter)."""
        return self.side.store.latest(client) or dict(global_state)

    def personal_context(self, client: str) -> AbstractContextManager[Any]:
        """What the personal adapter computes inside (default: nothing more; ``prompt``: the client's soft prompt)."""
        return nullcontext()

    def export(self, client: str, folder: Path) -> None:
        """Write what the personal model needs besides ``adapter/`` into the client's folder (default: nothing)."""

    def describe(self) -> dict[str, Any]:
        """What ``clients/<name>/personal.json`` says besides the method and ``combine``."""
        return {}


PERSONALIZATION: Registry[type[PersonalMethod]] = Registry(
    "personalization method",
    "personalization.method",
    [
        "fedlm.personalization.finetune",
        "fedlm.personalization.fedsa",
        "fedlm.personalization.ditto",
        "fedlm.personalization.dual",
        "fedlm.personalization.prompt",
    ],
)


def build_method(config: ExperimentConfig, side: ClientSide) -> PersonalMethod:
    """The configured method (``personalization.method``) on ``side``."""
    name = config.personalization.method or ""
    method: PersonalMethod = PERSONALIZATION.build(name, config.personalization.method_params(), side)
    return method
