"""Hierarchical aggregation (HierFAVG, ``hierarchy``): a closed-form toy with two edges, the reference that one edge
with one edge round is flat FedAvg bit for bit on the tiny model, the config's refusals, and one CLI run."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, write_config
from typer.testing import CliRunner

from fedlm.aggregation.base import build_aggregator
from fedlm.aggregation.lora import build_lora_mode
from fedlm.cli import app
from fedlm.config.io import validate_config
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.seeding import derive_seed
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate, TensorDict
from fedlm.experiment import Session, build_server_loop, build_session
from fedlm.federation.aggregation_step import AggregationStep
from fedlm.federation.tasks import TaskBuilder
from fedlm.federation.validation import RoundValidator
from fedlm.federation.wire import serialized_bytes
from fedlm.hierarchy.groups import auto_groups, resolve_groups
from fedlm.hierarchy.round import HierarchicalRound
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import RunDir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIENTS = ["noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.person", "noun.plant", "verb.communication", "verb.motion"]
NAMES = ("m.lora_A.weight", "m.lora_B.weight")


# 1. Closed form: two edges, two edge rounds, clients that move halfway to their own target ---------------------------


class HalfwayClients:
    """A runtime whose client k returns Delta = (t_k - x) / 2 from the x it was sent (n_k examples); it records
    every plan it receives."""

    def __init__(self, targets: Mapping[str, float], sizes: Mapping[str, int]) -> None:
        self.targets, self.sizes = targets, sizes
        self.plans: list[tuple[str, int, list[float]]] = []

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> list[ClientUpdate | ClientFailure]:
        out: list[ClientUpdate | ClientFailure] = []
        for client, task in tasks.items():
            self.plans.append((client, task.plan.seed, list(task.plan.lrs)))
            delta = {n: (self.targets[client] - x) / 2 for n, x in task.state.items()}
            out.append(ClientUpdate(client, task.plan.round, self.sizes[client], delta, {"loss": 1.0}))
        return out


class Keep(RoundObserver):
    def __init__(self) -> None:
        self.records: list[RoundRecord] = []

    def on_round(self, record: RoundRecord) -> None:
        self.records.append(record)


def _toy_round(
    groups: dict[str, list[str]], edge_rounds: int, targets: dict[str, float], sizes: dict[str, int]
) -> tuple[HierarchicalRound, HalfwayClients, Keep]:
    config = ExperimentConfig.model_validate(
        {
            "partition": {"method": "iid", "num_clients": len(targets)},
            "federation": {"rounds": 2, "local_steps": 1, "lr": 1.0, "lr_schedule": "linear", "min_lr_ratio": 0.0},
        }
    )
    state = {n: torch.zeros(2, 2) for n in NAMES}
    fedavg = build_aggregator("fedavg", {})
    lora = build_lora_mode("naive", state, 2)
    ranks: dict[str, int | None] = {}
    runtime, keep = HalfwayClients(targets, sizes), Keep()
    round_ = HierarchicalRound(
        list(targets), None, 0, TaskBuilder(config, fedavg, lora, ranks), runtime, RoundValidator(list(targets)),
        AggregationStep(fedavg, lora, ranks, 1), [keep], groups=groups, edge_rounds=edge_rounds,
    )  # fmt: skip
    return round_, runtime, keep


def test_two_edges_two_edge_rounds_closed_form() -> None:
    """Edge l: w_1 = w + (tbar_l - w)/2, w_2 = w_1 + (tbar_l - w_1)/2, so it uploads 3/4 (tbar_l - w) with weight
    N_l; the cloud: w + 3/4 (tbar - w), tbar the example-weighted mean of all targets (not the mean of the edges)."""
    targets = {"a": 4.0, "b": 8.0, "c": -2.0}
    sizes = {"a": 1, "b": 3, "c": 4}
    round_, runtime, keep = _toy_round({"left": ["a", "b"], "right": ["c"]}, 2, targets, sizes)
    w0 = {n: torch.full((2, 2), 1.0) for n in NAMES}
    record = round_.run(w0, 1)
    tbar_left = (1 * 4.0 + 3 * 8.0) / 4  # 7
    tbar = (4 * tbar_left + 4 * -2.0) / 8  # 2.5; the unweighted mean of the edges would be (7 - 2) / 2
    for n in NAMES:
        torch.testing.assert_close(record.state[n], torch.full((2, 2), 1.0 + 0.75 * (tbar - 1.0)), rtol=0, atol=1e-6)
        # the second edge round's clients started from their edge's model, not from the cloud model
        torch.testing.assert_close(record.tasks["a"].state[n], torch.full((2, 2), 1.0 + 0.5 * (tbar_left - 1.0)))
        torch.testing.assert_close(record.tasks["c"].state[n], torch.full((2, 2), 1.0 + 0.5 * (-2.0 - 1.0)))
    # learning rates on the linear schedule over rounds * edge_rounds * local_steps = 4 steps: 1, 3/4 in round 1
    assert [lrs for c, _, lrs in runtime.plans if c == "a"] == [[1.0], [0.75]]
    seeds = [seed for c, seed, _ in runtime.plans if c == "a"]
    assert seeds[0] == derive_seed(0, "local", 1, "a") and seeds[1] != seeds[0]  # edge round 1 is the flat round's seed
    # bytes per tier: every client's download and upload in each edge round; each edge's cloud model and change
    one = serialized_bytes(w0)
    tiers = record.fields["hierarchy"]
    assert tiers["client_edge_download_bytes"] == tiers["client_edge_upload_bytes"] == 2 * 3 * one
    assert tiers["edge_cloud_download_bytes"] == tiers["edge_cloud_upload_bytes"] == 2 * one
    assert tiers["edges"]["left"]["num_examples"] == 4 and tiers["edges"]["right"]["updates"] == 2
    assert sum(row["download_bytes"] for row in record.traffic.values()) == 2 * 3 * one
    assert [u.metrics["edge_round"] for u in record.accepted if u.client_id == "c"] == [1.0, 2.0]
    assert keep.records == [record]


def test_an_edge_without_sampled_clients_sits_out() -> None:
    targets = {"a": 1.0, "b": 2.0, "c": 3.0}
    round_, _, _ = _toy_round({"left": ["a"], "right": ["b", "c"]}, 1, targets, {"a": 1, "b": 1, "c": 1})
    round_.clients_per_round = 1
    record = round_.run({n: torch.zeros(2, 2) for n in NAMES}, 1)
    assert list(record.fields["hierarchy"]["edges"]) == [next(e for e, m in round_.groups.items() if record.chosen[0] in m)]


# 2. Groups ------------------------------------------------------------------------------------------------------------


def test_auto_groups_are_a_seeded_near_equal_partition() -> None:
    names = [f"c{i}" for i in range(10)]
    groups = auto_groups(names, 3, seed=7)
    assert list(groups) == ["edge_1", "edge_2", "edge_3"]
    assert sorted(len(m) for m in groups.values()) == [3, 3, 4]
    assert sorted(c for m in groups.values() for c in m) == sorted(names)
    assert groups == auto_groups(names, 3, seed=7) and groups != auto_groups(names, 3, seed=8)


def _hier(groups: Any, edge_rounds: int = 1) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {"partition": {"method": "by_field", "field": "domain"}, "hierarchy": {"groups": groups, "edge_rounds": edge_rounds}}
    )


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"e1": ["noun.animal"], "e2": ["nobody"]}, "`hierarchy.groups.e2` names 'nobody'"),
        ({"e1": CLIENTS[:-1]}, "clients 'verb.motion' are in no group"),
        ({"auto": 9}, "more edges than the 8 clients"),
    ],
)
def test_groups_must_cover_the_clients(groups: Any, message: str) -> None:
    with pytest.raises(FedlmError, match=message):
        resolve_groups(_hier(groups).hierarchy, CLIENTS, 0)  # type: ignore[arg-type]


# 3. Config refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"hierarchy": {"groups": {"auto": 2, "x": ["a"]}}}, "takes one positive integer N"),
        ({"hierarchy": {"groups": {"e1": ["a"], "e2": ["a"]}}}, "client 'a' is in both"),
        ({"hierarchy": {"groups": {"auto": 2}, "edge_rounds": 0}}, "edge_rounds"),
        ({"federation": {"runtime": "flower"}}, "built for `federation.runtime: simulation` only"),
        ({"aggregation": {"name": "scaffold"}}, "does not forward to the cloud"),
        ({"aggregation": {"name": "fedavg", "lora": "exact"}}, "aggregates the products"),
        ({"privacy": {"client_dp": {"noise_multiplier": 0.5}}}, "`privacy.client_dp` is not built for `hierarchy`"),
        ({"compression": {"uplink": {"method": "topk", "ratio": 0.1}}}, "`compression.uplink` is not built for `hierarchy`"),
        ({"federation": {"min_clients": 3}}, r"`federation.min_clients` \(3\) counts edge updates"),
    ],
)
def test_refusals_name_the_field(tmp_path: Path, sections: dict[str, Any], message: str) -> None:
    merged = {"hierarchy": {"groups": {"auto": 2}}, **sections}
    with pytest.raises(FedlmError, match=message):
        validate_config(tiny_config(tmp_path, **merged))


# 4. Reference on the tiny model: one edge, one edge round is flat FedAvg -------------------------------------------------


def _train(session: Session, root: Path, **changes: Any) -> TensorDict:
    config = session.config.model_copy(update=changes)
    run_dir = RunDir(root)
    run_dir.create()
    s = dataclasses.replace(session, config=config)
    loop = build_server_loop(s, s.aggregator(), run_dir, MetricsLog(run_dir.metrics), RunConsole(quiet=True), evaluate=False)
    return loop.run(dict(session.initial_state), 0)


def test_one_edge_is_flat_fedavg_bit_for_bit_and_edges_of_one_round_are_fedavg(tmp_path: Path) -> None:
    """Same seeds, same learning rates, same starting model: one edge with one edge round gives the flat run's adapter
    exactly; three edges of one edge round give FedAvg up to float rounding (the weighted mean regrouped)."""
    config = validate_config(tiny_config(tmp_path, federation={"rounds": 2, "local_steps": 1, "clients_per_round": 4}, eval={"every": 0}))
    session = build_session(config, RunConsole(quiet=True))
    flat = _train(session, tmp_path / "flat")
    one = _train(session, tmp_path / "one", hierarchy=validate_config({**tiny_config(tmp_path), "hierarchy": {"groups": {"auto": 1}}}).hierarchy)
    three = _train(session, tmp_path / "three", hierarchy=validate_config({**tiny_config(tmp_path), "hierarchy": {"groups": {"auto": 3}}}).hierarchy)
    assert set(flat) == set(one) and all(torch.equal(flat[n], one[n]) for n in flat)
    assert any(not torch.equal(flat[n], session.initial_state[n]) for n in flat)
    for n in flat:
        torch.testing.assert_close(three[n], flat[n], rtol=1e-5, atol=1e-6)


# 5. The CLI -------------------------------------------------------------------------------------------------------------


def test_cli_runs_hierarchical_rounds_and_logs_bytes_per_tier(tmp_path: Path) -> None:
    hierarchy = {"groups": {"west": CLIENTS[:3], "east": CLIENTS[3:]}, "edge_rounds": 2}
    federation = {"rounds": 1, "local_steps": 1, "clients_per_round": 4}
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_config(tmp_path / "run", hierarchy=hierarchy, federation=federation, eval={"every": 0, "generate": False, "max_examples": 8}),
    )
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    aggregate = next(r for r in records if r["split"] == "aggregate")
    tiers = aggregate["hierarchy"]
    assert tiers["edge_rounds"] == 2 and set(tiers["edges"]) <= {"west", "east"}
    assert tiers["client_edge_download_bytes"] == aggregate["download_bytes"] > tiers["edge_cloud_download_bytes"] > 0
    trains = [r for r in records if r["split"] == "train"]
    assert len(trains) == 2 * 4 and {r["edge_round"] for r in trains} == {1.0, 2.0}
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
