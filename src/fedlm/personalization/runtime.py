"""Personalization in the simulation: a runtime wrapper on the client side and the keeper of the clients' state.

:class:`PersonalizedRuntime` wraps the in-process runtime (inside every server-side wrapper: retries, attacks): the
method changes what each client starts from and what it uploads, and trains and saves its personal part in
``RUN_DIR/clients/<name>/``. As a round observer it drops the personal versions a resumed run replays and prunes
those no kept checkpoint needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.runtime import Runtime
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate, TensorDict
from fedlm.federation.checkpoint import list_checkpoints
from fedlm.personalization.base import PersonalMethod


def train_personal(
    method: PersonalMethod, client: str, task: ClientTask, train: Callable[[ClientTask], Sequence[ClientUpdate | ClientFailure]]
) -> list[ClientUpdate | ClientFailure]:
    """One client's round with ``method`` around it: the task it prepares, ``train`` inside :meth:`around`, then
    :meth:`after` on each update (the simulation's clients and a Flower SuperNode run exactly this)."""
    sent = method.prepare(client, task)
    with method.around(client, sent):
        trained = train(sent)
    return [method.after(r.client_id, sent, r) if isinstance(r, ClientUpdate) else r for r in trained]


@dataclass
class PersonalizedRuntime(RoundObserver):
    """Runs ``inner`` with ``method`` on the client side; keeps the store in step with the checkpoints."""

    inner: Runtime
    method: PersonalMethod
    checkpoints: Path

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> Sequence[ClientUpdate | ClientFailure]:
        """Each client trains from the task the method prepares; the method then trains or keeps its personal part."""
        results: list[ClientUpdate | ClientFailure] = []
        for client, task in tasks.items():  # one client at a time: a method may surround its training (a soft prompt)
            results.extend(train_personal(self.method, client, task, partial(self._train_one, client)))
        return results

    def _train_one(self, client: str, task: ClientTask) -> Sequence[ClientUpdate | ClientFailure]:
        return self.inner.train_clients({client: task})

    def on_start(self, state: TensorDict, start_round: int) -> None:
        self.method.side.store.rollback(start_round)

    def on_round(self, record: RoundRecord) -> None:
        rounds = [int(p.name.removeprefix("round_")) for p in list_checkpoints(self.checkpoints)]
        self.method.side.store.prune(rounds)
