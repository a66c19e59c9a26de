"""`federation.round_retries`: a round with too few updates sends the failed clients' tasks again.

A retried client gets the same task (same seed), so a round whose dropped clients come back on the retry ends with
exactly the model of a round where nobody dropped. Without retries, or when the clients stay away, the round is
skipped and the model kept; clients that could not be reached at all skip the round instead of stopping the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fedlm.aggregation.base import build_aggregator
from fedlm.config.io import validate_config
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.experiment import Session, build_server_loop, build_session
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import RunDir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    root = tmp_path_factory.mktemp("retries")
    config = validate_config(
        tiny_config(root / "run", federation={"rounds": 1, "clients_per_round": 3, "local_steps": 1, "batch_size": 2, "min_clients": 2})
    )
    return build_session(config, RunConsole(quiet=True))


class Flaky:
    """Wraps a runtime: the first ``away`` clients of the round are unreachable for the first ``outages`` calls."""

    def __init__(self, inner, away: int, outages: int) -> None:
        self.inner, self.away, self.outages, self.calls, self.down = inner, away, outages, [], []

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> list[ClientUpdate | ClientFailure]:
        if not self.calls:
            self.down = list(tasks)[: self.away]
        self.calls.append(list(tasks))
        down = set(self.down) if len(self.calls) <= self.outages else set()
        results = self.inner.train_clients({c: t for c, t in tasks.items() if c not in down})
        failures = [ClientFailure(c, t.plan.round, "node gone", unreachable=True) for c, t in tasks.items() if c in down]
        return [*results, *failures]


def _round(session: Session, tmp_path: Path, retries: int, away: int, outages: int) -> tuple[dict, list[dict], Flaky]:
    run_dir = RunDir(tmp_path / f"run-{retries}-{away}-{outages}")
    run_dir.create()
    log = MetricsLog(run_dir.metrics)
    loop = build_server_loop(session, build_aggregator("fedavg", {}), run_dir, log, RunConsole(quiet=True), evaluate=False)
    retrying = loop.round.runtime  # federation.round_retries wraps the runtime
    retrying.retries = retries
    retrying.inner = flaky = Flaky(retrying.inner, away, outages)
    state = loop.run_round(dict(session.initial_state), 1)
    return state, log.read(), flaky


def test_clients_back_on_the_retry_give_the_model_of_a_round_without_failures(session: Session, tmp_path: Path) -> None:
    clean, clean_records, _ = _round(session, tmp_path, retries=0, away=0, outages=0)
    state, records, flaky = _round(session, tmp_path, retries=2, away=2, outages=1)
    assert len(flaky.calls) == 2 and flaky.calls[1] == flaky.down  # the retry sends only the failed clients' tasks
    retry = [r for r in records if r["split"] == "retry"]
    assert len(retry) == 1 and retry[0]["attempt"] == 1 and retry[0]["clients"] == flaky.down
    aggregate = next(r for r in records if r["split"] == "aggregate")
    assert not aggregate["skipped"] and aggregate["num_updates"] == 3 and aggregate["rejected"] == []
    for name, tensor in clean.items():
        assert torch.equal(state[name], tensor), name
    assert any(not torch.equal(state[n], t) for n, t in session.initial_state.items())  # the round did train


def test_without_retries_too_few_updates_skip_the_round(session: Session, tmp_path: Path) -> None:
    state, records, flaky = _round(session, tmp_path, retries=0, away=2, outages=1)
    assert len(flaky.calls) == 1 and not [r for r in records if r["split"] == "retry"]
    aggregate = next(r for r in records if r["split"] == "aggregate")
    assert aggregate["skipped"] and aggregate["num_updates"] == 1 and len(aggregate["rejected"]) == 2
    for name, tensor in session.initial_state.items():
        assert torch.equal(state[name], tensor)


def test_clients_that_stay_away_use_up_the_retries_then_the_round_is_skipped(session: Session, tmp_path: Path) -> None:
    state, records, flaky = _round(session, tmp_path, retries=2, away=3, outages=10)
    assert len(flaky.calls) == 3
    assert [r["attempt"] for r in records if r["split"] == "retry"] == [1, 2]
    aggregate = next(r for r in records if r["split"] == "aggregate")
    assert aggregate["skipped"] and aggregate["num_updates"] == 0  # nobody reachable: skipped, the run goes on
    for name, tensor in session.initial_state.items():
        assert torch.equal(state[name], tensor)


def test_retry_settings_are_validated(tmp_path: Path) -> None:
    from fedlm.core.errors import FedlmError

    with pytest.raises(FedlmError, match="federation.round_retries"):
        validate_config(tiny_config(tmp_path / "run", federation={"round_retries": -1}))
    with pytest.raises(FedlmError, match="federation.retry_wait_s"):
        validate_config(tiny_config(tmp_path / "run", federation={"retry_wait_s": -0.5}))
