"""A new per-round concern plugs in as an observer, without editing the round (federation/server.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fedlm.aggregation.base import build_aggregator
from fedlm.config.io import validate_config
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.sampling import sample_clients
from fedlm.experiment import Session, build_server_loop, build_session
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import RunDir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    root = tmp_path_factory.mktemp("observers")
    config = validate_config(tiny_config(root / "run", federation={"rounds": 2, "clients_per_round": 2, "local_steps": 1, "batch_size": 2}))
    return build_session(config, RunConsole(quiet=True))


class UpdateNorms(RoundObserver):
    """A concern the round does not know: the norm of each accepted update, added to the round's record."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.records: list[RoundRecord] = []

    def on_start(self, state: dict[str, torch.Tensor], start_round: int) -> None:
        self.started.append(start_round)

    def on_round(self, record: RoundRecord) -> None:
        self.records.append(record)
        record.fields["update_norms"] = {
            u.client_id: float(torch.sqrt(sum((t.double() ** 2).sum() for t in u.tensors.values()))) for u in record.accepted
        }


def test_an_added_observer_sees_every_round_and_its_fields_are_logged(session: Session, tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    run_dir.create()
    log = MetricsLog(run_dir.metrics)
    norms = UpdateNorms()
    loop = build_server_loop(session, build_aggregator("fedavg", {}), run_dir, log, RunConsole(quiet=True), evaluate=False, observers=[norms])
    final = loop.run(dict(session.initial_state), 0)
    names, config = session.data.client_names, session.config
    assert norms.started == [0]
    assert [r.round for r in norms.records] == [1, 2]
    for record in norms.records:
        assert record.chosen == sample_clients(names, 2, config.seed, record.round)
        assert sorted(u.client_id for u in record.accepted) == sorted(record.chosen)
        assert record.traffic and all(row["upload_bytes"] > 0 for row in record.traffic.values())  # the traffic observer ran first
    assert norms.records[0].state is norms.records[1].start_state  # round 2 starts from round 1's result
    assert all(torch.equal(final[n], t) for n, t in norms.records[-1].state.items())
    logged = [r for r in log.read() if r["split"] == "aggregate"]
    assert [sorted(r["update_norms"]) for r in logged] == [sorted(r.chosen) for r in norms.records]
    assert all(v > 0 for r in logged for v in r["update_norms"].values())
