"""Systems heterogeneity (`systems` section): the simulated clock, deadlines (drop, partial with FedNova), FedBuff's
staleness weights and event order, device-profile and availability files; all against hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlm.aggregation.base import build_aggregator
from fedlm.aggregation.lora import build_lora_mode
from fedlm.config.io import validate_config
from fedlm.config.rules import check_federation
from fedlm.config.schema import ExperimentConfig
from fedlm.config.schema.systems import SystemsConfig
from fedlm.core.errors import FedlmError
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.task import ClientContext, ClientTask, LocalPlan
from fedlm.core.update import ClientFailure, ClientUpdate, TensorDict
from fedlm.federation.aggregation_step import AggregationStep
from fedlm.federation.server import Round
from fedlm.federation.tasks import TaskBuilder
from fedlm.federation.validation import RoundValidator
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.systems.clock import DEADLINE_REASON, AvailableRound, ClockObserver, SimClock, client_seconds, round_seconds, transfer_seconds
from fedlm.systems.deadline import DeadlineRuntime, fednova_scales, steps_within
from fedlm.systems.fedbuff import FedBuffLoop, FedBuffSettings, staleness_weight
from fedlm.systems.profiles import (
    DeviceProfile,
    SeededAvailability,
    WindowAvailability,
    read_availability,
    read_profiles,
    seeded_profiles,
)

FAST_NET = 1e12  # Mbit/s: transfers take ~1e-15 s, so only compute counts


def _profile(speed: float) -> DeviceProfile:
    return DeviceProfile(speed, FAST_NET, FAST_NET)


# ------------------------------------------------------------------------------------------ the clock by hand


def test_client_time_is_download_plus_steps_plus_upload() -> None:
    profile = DeviceProfile(steps_per_s=2.0, uplink_mbps=8.0, downlink_mbps=16.0)
    assert transfer_seconds(1_000_000, 8.0) == pytest.approx(1.0)
    # 2e6 B at 16 Mbit/s = 1 s; 4 steps at 2 steps/s = 2 s; 1e6 B at 8 Mbit/s = 1 s
    assert client_seconds(profile, 4, 2_000_000, 1_000_000) == pytest.approx(4.0)


def test_a_round_lasts_its_slowest_participant_or_the_deadline_when_one_was_dropped() -> None:
    assert round_seconds({"a": 4.0, "b": 3.0}, None, dropped=False) == 4.0
    assert round_seconds({"a": 4.0, "b": 3.0}, 5.0, dropped=False) == 4.0
    assert round_seconds({"a": 4.0, "b": 3.0}, 5.0, dropped=True) == 5.0
    assert round_seconds({}, 5.0, dropped=True) == 5.0


def _record(round_num: int, steps: Mapping[str, int], traffic: Mapping[str, tuple[int, int]], failures: list[ClientFailure]) -> RoundRecord:
    state = {"w": torch.zeros(1)}
    tasks = {c: ClientTask(LocalPlan(round_num, [0.1] * 10, 1, 0), state, ClientContext(c, round_num)) for c in traffic}
    updates = [ClientUpdate(c, round_num, 1, {"w": torch.zeros(1)}, {"loss": 1.0, "steps": float(s)}) for c, s in steps.items()]
    record = RoundRecord(round_num, list(traffic), tasks, updates, updates, failures, state, state, False, {}, 0.0)
    record.traffic = {c: {"download_bytes": d, "upload_bytes": u} for c, (d, u) in traffic.items()}
    return record


def test_the_clock_observer_adds_each_rounds_slowest_client(tmp_path: Path) -> None:
    profiles = {"a": DeviceProfile(2.0, 8.0, 16.0), "b": DeviceProfile(0.5, 8.0, 8.0)}
    clock = SimClock()
    observer = ClockObserver(profiles, clock, None, MetricsLog(tmp_path / "m.jsonl"))
    observer.on_start({}, 0)
    first = _record(1, {"a": 4, "b": 1}, {"a": (2_000_000, 1_000_000), "b": (1_000_000, 1_000_000)}, [])
    observer.on_round(first)
    # a: 1 + 2 + 1 = 4 s; b: 1 + 2 + 1 = 4 s... b: 1e6 B at 8 Mbit/s = 1 s, 1 step at 0.5/s = 2 s, 1 s up = 4 s
    assert first.traffic["a"]["client_sim_seconds"] == pytest.approx(4.0)
    assert first.traffic["b"]["client_sim_seconds"] == pytest.approx(4.0)
    assert first.fields["sim_seconds"] == pytest.approx(4.0)
    second = _record(2, {"a": 2}, {"a": (0, 0), "b": (0, 0)}, [ClientFailure("b", 2, f"{DEADLINE_REASON} (3 s)")])
    ClockObserver(profiles, clock, 3.0, MetricsLog(tmp_path / "m.jsonl")).on_round(second)
    assert second.fields["sim_round_seconds"] == pytest.approx(3.0)  # a took 1 s, but b was dropped: the deadline
    assert second.fields["sim_seconds"] == pytest.approx(7.0)
    assert second.fields["wall_seconds"] >= 0.0


# ------------------------------------------------------------------------------------------ deadlines by hand


def test_steps_within_the_deadline() -> None:
    profile = DeviceProfile(steps_per_s=2.0, uplink_mbps=8.0, downlink_mbps=8.0)
    # 1 s down + 1 s up leave 2 s of a 4 s deadline: 4 steps at 2 steps/s
    assert steps_within(profile, 4.0, 1_000_000, 1_000_000, planned=10) == 4
    assert steps_within(profile, 4.0, 1_000_000, 1_000_000, planned=3) == 3
    assert steps_within(profile, 2.0, 1_000_000, 1_000_000, planned=10) == 0
    assert steps_within(profile, 1.5, 1_000_000, 1_000_000, planned=10) == 0


def test_fednova_scales_by_hand() -> None:
    # equal sizes: tau_eff = (4 + 2) / 2 = 3; a: 3/4, b: 3/2
    assert fednova_scales({"a": 4, "b": 2}, {"a": 10, "b": 10}) == pytest.approx({"a": 0.75, "b": 1.5})
    # p = (3/4, 1/4): tau_eff = 3 + 0.5 = 3.5
    assert fednova_scales({"a": 4, "b": 2}, {"a": 30, "b": 10}) == pytest.approx({"a": 3.5 / 4, "b": 3.5 / 2})


class _StepRuntime:
    """Each client's delta is its step count (one step adds 1 to w); it records the plans it was given."""

    def __init__(self, values: Mapping[str, float] | None = None) -> None:
        self.values = values or {}
        self.plans: dict[str, list[LocalPlan]] = {}

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> list[ClientUpdate | ClientFailure]:
        out: list[ClientUpdate | ClientFailure] = []
        for client, task in tasks.items():
            self.plans.setdefault(client, []).append(task.plan)
            steps = len(task.plan.lrs)
            delta = self.values.get(client, float(steps))
            out.append(ClientUpdate(client, task.plan.round, 10, {"w": torch.tensor([delta])}, {"loss": 1.0, "steps": float(steps)}))
        return out


def _tasks(clients: list[str], steps: int) -> dict[str, ClientTask]:
    return {c: ClientTask(LocalPlan(1, [0.1] * steps, 1, 0), {"w": torch.zeros(1)}, ClientContext(c, 1)) for c in clients}


def test_deadline_drops_the_late_client() -> None:
    inner = _StepRuntime()
    runtime = DeadlineRuntime(inner, {"a": _profile(2.0), "b": _profile(0.5)}, 3.0, partial=False, fednova=True)
    results = runtime.train_clients(_tasks(["a", "b"], 4))  # a: 4 steps in 2 s; b: 1.5 of 4 fit
    assert isinstance(results[0], ClientUpdate) and results[0].metrics["steps"] == 4
    assert isinstance(results[1], ClientFailure) and results[1].reason.startswith(DEADLINE_REASON)
    assert "1 of its 4 steps" in results[1].reason
    assert list(inner.plans) == ["a"]  # b never trained


def test_deadline_partial_work_with_fednova_normalisation() -> None:
    inner = _StepRuntime()
    runtime = DeadlineRuntime(inner, {"a": _profile(2.0), "b": _profile(0.5), "c": _profile(0.1)}, 4.0, partial=True, fednova=True)
    results = runtime.train_clients(_tasks(["a", "b", "c"], 4))
    a, b, c = results
    assert len(inner.plans["b"][0].lrs) == 2  # 4 s at 0.5 steps/s
    assert isinstance(c, ClientFailure)  # 0.4 steps fit: nothing to send
    assert isinstance(a, ClientUpdate) and isinstance(b, ClientUpdate)
    # tau = (4, 2), equal sizes: tau_eff = 3; delta_a = 4 * 3/4 = 3, delta_b = 2 * 3/2 = 3
    assert a.tensors["w"].item() == pytest.approx(3.0) and b.tensors["w"].item() == pytest.approx(3.0)
    assert b.metrics["fednova_scale"] == pytest.approx(1.5)
    plain = DeadlineRuntime(_StepRuntime(), {"a": _profile(2.0), "b": _profile(0.5)}, 4.0, partial=True, fednova=False)
    assert [r.tensors["w"].item() for r in plain.train_clients(_tasks(["a", "b"], 4)) if isinstance(r, ClientUpdate)] == [4.0, 2.0]


# ------------------------------------------------------------------------------------------ FedBuff by hand


def test_staleness_weights_by_hand() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)  # 1/sqrt(4)
    assert staleness_weight(8) == pytest.approx(1 / 3)  # 1/sqrt(9)
    assert staleness_weight(1, exponent=1.0) == pytest.approx(0.5)
    assert staleness_weight(5, exponent=0.0) == 1.0


class _Records(RoundObserver):
    def __init__(self) -> None:
        self.records: list[RoundRecord] = []

    def on_round(self, record: RoundRecord) -> None:
        self.records.append(record)


def _fedbuff_loop(
    profiles: Mapping[str, DeviceProfile], values: Mapping[str, float], rounds: int, buffer_size: int, seed: int = 0
) -> tuple[FedBuffLoop, _Records]:
    names = list(profiles)
    state: TensorDict = {"w": torch.zeros(1)}
    config = ExperimentConfig.model_validate({"seed": seed, "federation": {"local_steps": 2, "rounds": rounds}})
    aggregator = build_aggregator("fedavg", {})
    lora = build_lora_mode("naive", state, 4)
    tasks = TaskBuilder(config, aggregator, lora, {})
    step = AggregationStep(aggregator, lora, {}, 1)
    records = _Records()
    round_ = Round(names, None, seed, tasks, _StepRuntime(values), RoundValidator(names, None), step, [records])
    settings = FedBuffSettings(buffer_size, len(names), 0.5)
    return FedBuffLoop(round_, rounds, [], profiles, settings), records


def test_fedbuff_event_order_staleness_and_step_by_hand() -> None:
    # 2 local steps: a takes 1 s, b 3 s, c 7.5 s; all start at t=0 from version 0; buffer of 2
    profiles = {"a": _profile(2.0), "b": _profile(2 / 3), "c": _profile(2 / 7.5)}
    loop, seen = _fedbuff_loop(profiles, {"a": 1.0, "b": 2.0, "c": 4.0}, rounds=3, buffer_size=2)
    final = loop.run({"w": torch.zeros(1)}, 0)
    # t=1 a (v0); t=3 b (v0) -> step 1; a, b restart from v1: t=4 a; t=6 b -> step 2; a, b restart from v2:
    # t=7 a (v2); t=7.5 c (started at v0, now v2: staleness 2, weight 1/sqrt(3)) -> step 3
    assert [r.chosen for r in seen.records] == [["a", "b"], ["a", "b"], ["a", "c"]]
    assert [r.fields["sim_seconds"] for r in seen.records] == pytest.approx([3.0, 6.0, 7.5])
    assert [r.metrics["staleness"] for r in seen.records] == [{"a": 0, "b": 0}, {"a": 0, "b": 0}, {"a": 0, "c": 2}]
    assert seen.records[2].accepted[1].metrics["staleness_weight"] == pytest.approx(1 / math.sqrt(3))
    # FedAvg over equal sizes: 1.5 + 1.5 + (1 + 4/sqrt(3)) / 2
    assert final["w"].item() == pytest.approx(3.0 + (1.0 + 4.0 / math.sqrt(3)) / 2, rel=1e-6)
    assert seen.records[2].fields["in_flight"] == 1  # b, restarted at t=6 (a and c wait for the next dispatch)


def test_fedbuff_is_deterministic_and_refuses_to_resume() -> None:
    profiles = {f"c{i}": _profile(0.5 + 0.37 * i) for i in range(5)}
    values = {c: float(i + 1) for i, c in enumerate(profiles)}
    runs = []
    for _ in range(2):
        loop, seen = _fedbuff_loop(profiles, values, rounds=6, buffer_size=2, seed=3)
        runs.append((loop.run({"w": torch.zeros(1)}, 0)["w"].item(), [r.chosen for r in seen.records]))
    assert runs[0] == runs[1]
    with pytest.raises(FedlmError, match="cannot be resumed"):
        loop.run({"w": torch.zeros(1)}, 2)


# ------------------------------------------------------------------------------------------ profiles and availability


def test_seeded_profiles_make_the_asked_clients_slow() -> None:
    names = [f"c{i}" for i in range(8)]
    config = SystemsConfig(steps_per_s=2.0, slow_clients=2, slow_factor=5.0)
    profiles = seeded_profiles(config, names, seed=1)
    assert sorted(p.steps_per_s for p in profiles.values()) == pytest.approx([0.4, 0.4] + [2.0] * 6)
    assert profiles == seeded_profiles(config, names, seed=1)
    spread = seeded_profiles(SystemsConfig(speed_sigma=0.5), names, seed=1)
    assert len({p.steps_per_s for p in spread.values()}) == 8


def test_availability_windows_and_the_round_samples_only_online_clients() -> None:
    windows = WindowAvailability({"a": [(0.0, 10.0)], "b": [(5.0, math.inf)], "c": [(20.0, 30.0)]})
    assert windows.online("a", 0.0) and not windows.online("b", 0.0) and not windows.online("a", 10.0)
    assert windows.next_online(["b", "c"], 0.0) == 5.0
    assert windows.next_online(["c"], 31.0) is None
    clock = SimClock(now=12.0)  # only b is online; the round waits for no one
    names = ["a", "b", "c"]
    state: TensorDict = {"w": torch.zeros(1)}
    config = ExperimentConfig.model_validate({"federation": {"local_steps": 2}})
    aggregator = build_aggregator("fedavg", {})
    lora = build_lora_mode("naive", state, 4)
    inner = Round(
        names, 2, 0, TaskBuilder(config, aggregator, lora, {}), _StepRuntime(), RoundValidator(names, None), AggregationStep(aggregator, lora, {}, 1)
    )
    record = AvailableRound.around(inner, windows, clock).run(state, 1)
    assert record.chosen == ["b"]
    clock.now = 40.0
    with pytest.raises(FedlmError, match="no client is online"):
        AvailableRound.around(inner, WindowAvailability({"a": [(0.0, 1.0)]}), clock).run(state, 2)


def test_seeded_availability_is_a_pure_function_of_the_seed() -> None:
    trace = SeededAvailability(0.5, 60.0, seed=7)
    on = [trace.online("a", 60.0 * slot) for slot in range(200)]
    assert on == [SeededAvailability(0.5, 60.0, seed=7).online("a", 60.0 * slot + 30.0) for slot in range(200)]
    assert 60 < sum(on) < 140
    first = trace.next_online(["a"], 0.0)
    assert first is not None and trace.online("a", first)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_profile_csv_is_read_and_bad_rows_are_refused_naming_file_row_and_field(tmp_path: Path) -> None:
    good = _write(tmp_path / "p.csv", "client,steps_per_s,uplink_mbps,downlink_mbps\na,2,10,50\nb,0.4,5,20\n")
    assert read_profiles(good, ["a", "b"]) == {"a": DeviceProfile(2.0, 10.0, 50.0), "b": DeviceProfile(0.4, 5.0, 20.0)}
    with pytest.raises(FedlmError, match=r"p.csv: no row for client 'c' \(field client\)"):
        read_profiles(good, ["a", "b", "c"])
    negative = _write(tmp_path / "n.csv", "client,steps_per_s,uplink_mbps,downlink_mbps\na,2,10,50\nb,-1,5,20\n")
    with pytest.raises(FedlmError, match=r"n.csv row 3, field steps_per_s: must be > 0, got -1"):
        read_profiles(negative)
    garbled = _write(tmp_path / "g.csv", "client,steps_per_s,uplink_mbps,downlink_mbps\na,2,fast,50\n")
    with pytest.raises(FedlmError, match=r"g.csv row 2, field uplink_mbps: cannot read 'fast' as a number"):
        read_profiles(garbled)
    short = _write(tmp_path / "s.csv", "client,steps_per_s,uplink_mbps,downlink_mbps\na,2,10\n")
    with pytest.raises(FedlmError, match=r"s.csv row 2: expected 4 fields"):
        read_profiles(short)


def test_availability_csv_is_read_and_bad_rows_are_refused(tmp_path: Path) -> None:
    good = _write(tmp_path / "a.csv", "client,start_s,end_s\na,0,10\na,20,inf\nb,5,6\n")
    trace = read_availability(good, ["a", "b"])
    assert trace.online("a", 25.0) and not trace.online("a", 15.0)
    with pytest.raises(FedlmError, match=r"a.csv: no row for client 'c'"):
        read_availability(good, ["a", "b", "c"])
    backwards = _write(tmp_path / "b.csv", "client,start_s,end_s\na,10,5\n")
    with pytest.raises(FedlmError, match=r"b.csv row 2, field end_s: 5 is before start_s 10"):
        read_availability(backwards)
    with pytest.raises(FedlmError, match=r"c.csv row 2, field start_s: must be >= 0, got -3"):
        read_availability(_write(tmp_path / "c.csv", "client,start_s,end_s\na,-3,5\n"))


# ------------------------------------------------------------------------------------------ refused at load


def _raw(**sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {"partition": {"method": "iid", "num_clients": 4}}
    raw.update(sections)
    return raw


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"systems": {"mode": "fedbuff"}, "aggregation": {"name": "scaffold"}},
            r"fedbuff` cannot run with `aggregation.name: scaffold`: its clients upload",
        ),
        (
            {"systems": {"mode": "fedbuff"}, "privacy": {"secure_aggregation": {}}},
            r"fedbuff` cannot run under `privacy.secure_aggregation`: SecAgg\+ masks",
        ),
        ({"systems": {"mode": "fedbuff"}, "federation": {"round_deadline_s": 5}}, r"fedbuff` cannot run with `federation.round_deadline_s`"),
        (
            {"systems": {"mode": "fedbuff", "fedbuff": {"buffer_size": 2}}, "federation": {"min_clients": 3}},
            r"`federation.min_clients` \(3\) must be <=",
        ),
        ({"systems": {"mode": "fedbuff", "fedbuff": {"concurrency": 5}}}, r"`systems.fedbuff.concurrency` must be <= the number of clients \(4\)"),
        ({"federation": {"round_deadline_s": 5}}, r"`federation.round_deadline_s` needs a `systems` section"),
        ({"systems": {}, "federation": {"runtime": "flower"}}, r"`systems.mode: sync` \(the simulated clock and deadlines\) is built for"),
        (
            {"systems": {"mode": "fedbuff", "slow_clients": 1}, "federation": {"runtime": "flower"}},
            r"`systems.slow_clients` describe simulated devices; over `federation.runtime: flower` the devices are real",
        ),
        (
            {"systems": {"late_clients": "partial"}, "federation": {"round_deadline_s": 5, "algorithm": "fedkseed"}},
            r"late_clients: partial` cannot run with",
        ),
    ],
)
def test_combinations_refused_at_load(sections: dict[str, Any], message: str) -> None:
    with pytest.raises(FedlmError, match=message):
        validate_config(_raw(**sections))


def test_a_bad_profile_file_is_refused_at_load_and_a_missing_client_once_the_clients_are_known(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.csv", "client,steps_per_s,uplink_mbps,downlink_mbps\nclient_0,abc,10,50\n")
    with pytest.raises(FedlmError, match=r"bad.csv row 2, field steps_per_s: cannot read 'abc'"):
        validate_config(_raw(systems={"profiles": str(bad)}))
    partial = _write(tmp_path / "partial.csv", "client,steps_per_s,uplink_mbps,downlink_mbps\nclient_0,1,10,50\n")
    config = validate_config(_raw(systems={"profiles": str(partial)}))
    with pytest.raises(FedlmError, match=r"partial.csv: no row for client 'client_1'"):
        check_federation(config, ["client_0", "client_1"])


def test_a_resumed_run_continues_the_logged_clock(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"round": 1, "split": "aggregate", "sim_seconds": 4.0, "wall_seconds": 2.0})
    log.append({"round": 2, "split": "aggregate", "sim_seconds": 9.5, "wall_seconds": 3.0})
    clock = SimClock()
    ClockObserver({}, clock, None, log).on_start({}, 2)
    assert clock.now == 9.5 and clock.wall_seconds() >= 3.0


class _FailingRuntime:
    def train_clients(self, tasks: Mapping[str, ClientTask]) -> list[ClientUpdate | ClientFailure]:
        return [ClientFailure(c, t.plan.round, "loss is NaN") for c, t in tasks.items()]


def test_fedbuff_stops_when_every_client_fails() -> None:
    loop, _ = _fedbuff_loop({"a": _profile(1.0), "b": _profile(2.0)}, {}, rounds=2, buffer_size=1)
    loop.round.runtime = _FailingRuntime()
    with pytest.raises(FedlmError, match="failed clients since the last server step; first: loss is NaN"):
        loop.run({"w": torch.zeros(1)}, 0)
