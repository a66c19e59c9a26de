"""Every server-side rejection rule: a bad update sent in a real round on the tiny model is rejected with its reason
in metrics.jsonl, and the round completes with the others (or is skipped below `federation.min_clients`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fedlm.aggregation.base import build_aggregator
from fedlm.aggregation.fedavg import fedavg_step
from fedlm.config.io import validate_config
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.experiment import Session, build_server_loop, build_session
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import RunDir

pytestmark = pytest.mark.usefixtures("one_torch_thread")
Mutation = Callable[[list[ClientUpdate]], list[ClientUpdate]]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    root = tmp_path_factory.mktemp("validation")
    config = validate_config(
        tiny_config(
            root / "run",
            federation={"rounds": 1, "clients_per_round": 3, "local_steps": 1, "batch_size": 2, "min_clients": 2, "max_num_examples": 1000},
        )
    )
    return build_session(config, RunConsole(quiet=True))


class Tampering:
    """Wraps a runtime: the honest results of the round, then ``mutation`` applied to the updates."""

    def __init__(self, inner, mutation: Mutation) -> None:
        self.inner, self.mutation, self.honest = inner, mutation, []

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> list[ClientUpdate | ClientFailure]:
        results = self.inner.train_clients(tasks)
        self.honest = [r for r in results if isinstance(r, ClientUpdate)]
        return self.mutation(list(self.honest))


def _round(session: Session, tmp_path: Path, mutation: Mutation) -> tuple[dict, dict, Tampering]:
    run_dir = RunDir(tmp_path / "run")
    run_dir.create()
    log = MetricsLog(run_dir.metrics)
    loop = build_server_loop(session, build_aggregator("fedavg", {}), run_dir, log, RunConsole(quiet=True), evaluate=False)
    loop.round.runtime = tampering = Tampering(loop.round.runtime, mutation)
    state = loop.run_round(dict(session.initial_state), 1)
    record = next(r for r in log.read() if r["split"] == "aggregate")
    return state, record, tampering


def _replace_first(**changes) -> Mutation:
    return lambda ups: [dataclasses.replace(ups[0], **changes), *ups[1:]]


def _with_tensors(change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Mutation:
    return lambda ups: [dataclasses.replace(ups[0], tensors=change(dict(ups[0].tensors))), *ups[1:]]


def _first_name(t: dict[str, torch.Tensor]) -> str:
    return sorted(t)[0]


RULES: dict[str, tuple[Mutation, str]] = {
    "missing tensor": (_with_tensors(lambda t: {k: v for k, v in t.items() if k != _first_name(t)}), "missing"),
    "extra tensor": (_with_tensors(lambda t: {**t, "intruder.weight": torch.zeros(2)}), "extra"),
    "wrong shape": (_with_tensors(lambda t: {**t, _first_name(t): torch.zeros(3, 3)}), "shape"),
    "wrong dtype": (_with_tensors(lambda t: {**t, _first_name(t): t[_first_name(t)].double()}), "dtype"),
    "NaN": (_with_tensors(lambda t: {**t, _first_name(t): torch.full_like(t[_first_name(t)], float("nan"))}), "NaN or Inf"),
    "Inf": (_with_tensors(lambda t: {**t, _first_name(t): torch.full_like(t[_first_name(t)], float("inf"))}), "NaN or Inf"),
    "zero examples": (_replace_first(num_examples=0), "num_examples must be positive"),
    "negative examples": (_replace_first(num_examples=-5), "num_examples must be positive"),
    "examples above the cap": (_replace_first(num_examples=10**6), "`federation.max_num_examples`"),
    "stale round": (_replace_first(round=0), "stale or replayed"),
    "future round": (_replace_first(round=7), "stale or replayed"),
    "client outside the federation": (_replace_first(client_id="mallory"), "not part of the federation"),
    "non-finite extra": (_replace_first(extras={"x": torch.tensor([float("nan")])}), "extra tensor"),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_a_bad_update_is_rejected_and_the_round_completes(session: Session, tmp_path: Path, rule: str) -> None:
    mutation, reason = RULES[rule]
    state, record, tampering = _round(session, tmp_path, mutation)
    bad, good = tampering.honest[0], tampering.honest[1:]
    assert record["num_updates"] == 2 and not record["skipped"]
    assert len(record["rejected"]) == 1 and reason in record["rejected"][0]["reason"], record["rejected"]
    expected = fedavg_step(session.initial_state, [u.tensors for u in good], [u.num_examples for u in good])
    for name in expected:
        torch.testing.assert_close(state[name], expected[name])
    assert bad.client_id in record["clients"]


def test_a_second_update_from_the_same_client_is_rejected(session: Session, tmp_path: Path) -> None:
    state, record, tampering = _round(session, tmp_path, lambda ups: [*ups, dataclasses.replace(ups[0], num_examples=999)])
    assert record["num_updates"] == 3
    assert [r["reason"] for r in record["rejected"]] == ["rejected: a second update from this client in the same round"]
    honest = tampering.honest
    expected = fedavg_step(session.initial_state, [u.tensors for u in honest], [u.num_examples for u in honest])
    for name in expected:
        torch.testing.assert_close(state[name], expected[name])


def test_an_update_from_a_client_not_asked_this_round_is_rejected(session: Session, tmp_path: Path) -> None:
    def from_an_idle_client(ups: list[ClientUpdate]) -> list[ClientUpdate]:
        asked = {u.client_id for u in ups}
        idle = next(c for c in session.data.client_names if c not in asked)
        return [*ups, dataclasses.replace(ups[0], client_id=idle)]

    _, record, _ = _round(session, tmp_path, from_an_idle_client)
    assert record["num_updates"] == 3 and "was not asked to train" in record["rejected"][0]["reason"]


def test_too_few_valid_updates_skip_the_round_and_keep_the_model(session: Session, tmp_path: Path) -> None:
    nan = lambda u: dataclasses.replace(u, tensors={k: torch.full_like(v, float("nan")) for k, v in u.tensors.items()})  # noqa: E731
    state, record, _ = _round(session, tmp_path, lambda ups: [nan(ups[0]), nan(ups[1]), ups[2]])  # 1 valid < min_clients 2
    assert record["skipped"] and record["num_updates"] == 1 and len(record["rejected"]) == 2
    for name, tensor in session.initial_state.items():
        assert torch.equal(state[name], tensor)
