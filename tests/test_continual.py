"""Continual federated learning, without a model: the forgetting measures against hand-computed values, the stream
(who holds what, who is present, the stages), reservoir sampling against its known distribution, EWC's penalty and
Fisher against closed forms, the runtime's data per round, and the config's refusals."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlm.config.io import validate_config
from fedlm.config.schema.continual import ContinualConfig
from fedlm.continual.data import ContinualData
from fedlm.continual.ewc import EWCHook, EWCState, consolidate, diagonal_fisher, ewc_penalty
from fedlm.continual.metrics import average_accuracy, average_forgetting, backward_transfer, forward_transfer
from fedlm.continual.observer import own_stages, summaries
from fedlm.continual.rehearsal import ReplayBuffer, reservoir_offer
from fedlm.continual.runtime import ContinualRuntime
from fedlm.continual.schedule import Stream, StreamSampler, build_stream
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import torch_generator
from fedlm.core.task import ClientContext, ClientTask, LocalPlan
from fedlm.core.update import ClientUpdate
from fedlm.personalization.store import ClientStore

# ----------------------------------------------------------------------------------------- forgetting by hand

# Three stages, one slice each (a arrives at stage 1, b at 2, c at 3); row 0 is the starting model.
R = {
    0: {"a": 0.10, "b": 0.20, "c": 0.30},
    1: {"a": 0.80, "b": 0.25, "c": 0.30},
    2: {"a": 0.60, "b": 0.90, "c": 0.40},
    3: {"a": 0.50, "b": 0.70, "c": 0.95},
}
OWN = {"a": 1, "b": 2, "c": 3}


def test_average_accuracy_by_hand() -> None:
    assert average_accuracy(R, OWN, 1) == pytest.approx(0.80)
    assert average_accuracy(R, OWN, 2) == pytest.approx((0.60 + 0.90) / 2)
    assert average_accuracy(R, OWN, 3) == pytest.approx((0.50 + 0.70 + 0.95) / 3)


def test_average_forgetting_by_hand() -> None:
    # Chaudhry et al. 2018: f_j^k = max_{l<k} R[l][j] - R[k][j]
    assert average_forgetting(R, OWN, 1) is None
    assert average_forgetting(R, OWN, 2) == pytest.approx(0.80 - 0.60)
    # a: max(0.8, 0.6) - 0.5 = 0.3; b: max(0.25, 0.9) - 0.7 = 0.2
    assert average_forgetting(R, OWN, 3) == pytest.approx((0.3 + 0.2) / 2)


def test_backward_and_forward_transfer_by_hand() -> None:
    # Lopez-Paz & Ranzato 2017: BWT = mean_{i<T} R[T][i] - R[i][i]; FWT = mean_{i>=2} R[i-1][i] - b_i
    assert backward_transfer(R, OWN, 3) == pytest.approx(((0.50 - 0.80) + (0.70 - 0.90)) / 2)
    assert forward_transfer(R, OWN, 3) == pytest.approx(((0.25 - 0.20) + (0.40 - 0.30)) / 2)
    without_start = {k: v for k, v in R.items() if k != 0}
    assert forward_transfer(without_start, OWN, 3) is None


def test_loss_summaries_use_the_negative_loss() -> None:
    records = [{"split": "continual", "stage": k, "slice": j, "loss": 1.0 - v} for k, row in R.items() for j, v in row.items()]
    got = summaries(records, OWN, 3)["loss"]
    assert got["average"] == pytest.approx(1.0 - (0.50 + 0.70 + 0.95) / 3)  # a mean loss, in the loss's units
    assert got["forgetting"] == pytest.approx(0.25)  # the loss rose: forgetting is positive
    assert got["bwt"] == pytest.approx(-0.25)


# ----------------------------------------------------------------------------------------------- the stream


def _stream(**continual: Any) -> Stream:
    config = ContinualConfig.model_validate({"field": "t", **continual})
    sizes = {c: {"s1": 3, "s2": 2, "s3": 4} for c in ("x", "y", "z")}
    return build_stream(config, ["x", "y", "z"], sizes, rounds=6)


def test_schedule_membership_and_stages() -> None:
    stream = _stream(schedule={"x": {"s1": 1, "s2": 3}, "y": {"s1": 1, "s3": 5}, "z": {"s2": 3}}, membership={"y": {"first": 1, "last": 4}})
    assert stream.slices == ("s1", "s2", "s3")
    assert stream.held("x", 1) == ("s1",) and stream.held("x", 3) == ("s2",) and stream.held("z", 2) == ()
    assert stream.present(["x", "y", "z"], 2) == ["x", "y"]
    assert stream.present(["x", "y", "z"], 3) == ["x", "y", "z"]
    assert stream.present(["x", "y", "z"], 5) == ["x", "z"]  # y left after round 4
    assert [(s.index, s.first, s.last, s.slices) for s in stream.stages()] == [(1, 1, 2, ("s1",)), (2, 3, 4, ("s2",)), (3, 5, 6, ("s3",))]
    assert stream.stage_ending_at(4) is not None and stream.stage_ending_at(3) is None
    assert own_stages(stream) == {"s1": 1, "s2": 2, "s3": 3}
    for seed in range(5):
        assert set(StreamSampler(stream)(["x", "y", "z"], 1, seed, 2)) <= {"x", "y"}


def test_stream_round_and_accumulate() -> None:
    stream = _stream(stream="round", slices=["s3", "s1"], rounds_per_slice=2, accumulate=True)
    assert stream.arrivals["y"] == {"s3": 1, "s1": 3}
    assert stream.held("y", 2) == ("s3",) and stream.held("y", 4) == ("s3", "s1")
    assert _stream(stream="round", slices=["s3", "s1"], rounds_per_slice=2).held("y", 4) == ("s1",)


@pytest.mark.parametrize(
    ("continual", "needle"),
    [
        ({"schedule": {"w": {"s1": 1}}}, "`continual.schedule` names client 'w'"),
        ({"stream": "round", "slices": ["s1"], "membership": {"nobody": {"first": 2}}}, "`continual.membership` names client 'nobody'"),
        ({"schedule": {"x": {"s1": 9}}}, "`continual.schedule.x.s1` arrives at round 9"),
        ({"schedule": {"x": {"s1": 2}}}, "round 1 has 0 client(s) present"),
        ({"stream": "round", "slices": ["s1", "s2", "s3"], "rounds_per_slice": 3}, "`continual.slices`: s3 would arrive after"),
    ],
)
def test_bad_streams_are_refused_naming_the_field(continual: dict[str, Any], needle: str) -> None:
    with pytest.raises(FedlmError) as err:
        _stream(**continual)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("continual", "needle"),
    [
        ({"stream": "round", "slices": ["a"], "membership": {"0": {"first": 3, "last": 2}}}, "continual.membership.0"),
        ({"stream": "round"}, "`continual.slices` is required"),
        ({"slices": ["a"]}, "exactly one of `stream: round` and `schedule`"),
        ({"schedule": {"0": {"b": 1}}, "slices": ["a"]}, "names slice 'b', which is not in `continual.slices`"),
    ],
)
def test_bad_continual_sections_are_refused_at_load(continual: dict[str, Any], needle: str) -> None:
    raw = {"partition": {"method": "iid", "num_clients": 2}, "continual": continual}
    with pytest.raises(FedlmError) as err:
        validate_config(raw)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"federation": {"runtime": "flower"}}, "in-process simulation only"),
        ({"personalization": {"method": "finetune"}}, "`personalization.method`"),
        ({"objective": "clm"}, "`objective: clm`"),
        ({"privacy": {"sample_dp": {"noise_multiplier": 1.0}}}, "`privacy.sample_dp`"),
    ],
)
def test_unsupported_combinations_are_refused_at_load(extra: dict[str, Any], needle: str) -> None:
    raw = {"partition": {"method": "iid", "num_clients": 2}, "continual": {"stream": "round", "slices": ["a"]}, **extra}
    with pytest.raises(FedlmError) as err:
        validate_config(raw)
    assert needle in str(err.value)


# ------------------------------------------------------------------------------------------------ rehearsal


def test_reservoir_keeps_each_item_with_probability_capacity_over_n() -> None:
    capacity, n, trials = 4, 12, 3000
    kept = [0] * n
    for seed in range(trials):
        buffer: list[tuple[int, int]] = []
        seen = reservoir_offer(buffer, 0, [(0, i) for i in range(n)], capacity, torch_generator(seed))
        assert seen == n and len(buffer) == capacity and len(set(buffer)) == capacity
        for _, i in buffer:
            kept[i] += 1
    p = capacity / n  # Vitter 1985: every item ends in the reservoir with probability k/n
    sd = math.sqrt(trials * p * (1 - p))
    assert all(abs(k - trials * p) < 5 * sd for k in kept)


def test_replay_buffer_round_trip_and_replay_excludes_held_slices() -> None:
    buffer = ReplayBuffer(3)
    buffer.offer_slice(0, 2, seed=1)
    buffer.offer_slice(0, 2, seed=99)  # offered once
    buffer.offer_slice(1, 5, seed=2)
    assert buffer.seen == 7 and len(buffer.items) == 3
    assert all(i != 1 for i, _ in buffer.replay([1]))
    again = ReplayBuffer.from_tensors(3, buffer.to_tensors())
    assert (again.items, again.seen, again.offered) == (buffer.items, buffer.seen, buffer.offered)
    assert ReplayBuffer.from_tensors(3, None).items == []


# ------------------------------------------------------------------------------------------------------ EWC


def test_ewc_penalty_closed_form() -> None:
    params = {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([3.0])}
    fisher = {"w": torch.tensor([0.5, 2.0]), "v": torch.tensor([4.0])}
    anchor = {"w": torch.tensor([0.0, 1.0]), "v": torch.tensor([1.0])}
    # lambda/2 * (0.5*1 + 2*1 + 4*4) = 5 * 18.5
    assert float(ewc_penalty(params, fisher, anchor, 10.0)) == pytest.approx(92.5)
    assert float(ewc_penalty({"w": params["w"]}, fisher, anchor, 10.0)) == pytest.approx(12.5)  # v frozen this round
    assert torch.equal(consolidate({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, 0.5)["w"], torch.tensor([2.5]))


class _Regression:
    """A stand-in objective: squared error of a linear model on (x, y) examples."""

    def collate(self, examples: list[tuple[torch.Tensor, float]], pad_id: int) -> dict[str, torch.Tensor]:
        return {"x": torch.stack([x for x, _ in examples]), "y": torch.tensor([y for _, y in examples])}

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean(), {}


def test_diagonal_fisher_is_the_mean_squared_per_example_gradient() -> None:
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
    examples = [(torch.tensor([1.0, 0.0, 2.0]), 1.0), (torch.tensor([0.0, 3.0, -1.0]), 0.5)]
    fisher = diagonal_fisher(model, _Regression(), examples, 0, torch.device("cpu"))  # type: ignore[arg-type]
    w = model.weight.detach()[0]
    expected = sum((2 * (float(w @ x) - y) * x) ** 2 for x, y in examples) / 2  # d/dw (w.x - y)^2 = 2 (w.x - y) x
    torch.testing.assert_close(fisher["weight"][0], expected)
    assert model.weight.grad is None


def test_ewc_state_consolidates_when_the_slices_change_and_round_trips() -> None:
    state = EWCState(pending_fisher={"w": torch.tensor([1.0])}, pending_anchor={"w": torch.tensor([0.3])}, pending_slices=(0,))
    state.begin_slices([0], gamma=1.0)
    assert not state.fisher  # the same slice: still pending
    state.begin_slices([1], gamma=1.0)
    assert torch.equal(state.fisher["w"], torch.tensor([1.0])) and torch.equal(state.anchor["w"], torch.tensor([0.3])) and not state.pending_fisher
    again = EWCState.from_tensors(state.to_tensors())
    assert torch.equal(again.fisher["w"], state.fisher["w"]) and again.pending_slices == ()


def test_ewc_hook_adds_the_penalty_and_leaves_a_pending_fisher() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    hook = EWCHook(model, _Regression(), 0, torch.device("cpu"), strength=2.0, samples=1)  # type: ignore[arg-type]
    client = EWCState(fisher={"weight": torch.ones(1, 2)}, anchor={"weight": torch.zeros(1, 2)})
    hook.use(client, [(torch.tensor([1.0, 1.0]), 0.0)], [1], seed=0)
    hook.begin(ClientContext("x", 1), {})
    params = {"weight": torch.tensor([[1.0, 2.0]])}
    assert float(hook.extra_loss(params, {})) == pytest.approx(5.0)  # 2/2 * (1 + 4)
    hook.end(params, {}, [0.1], None)
    assert client.pending_slices == (1,) and set(client.pending_fisher) == {"weight"} and hook.client is None


# ------------------------------------------------------------------------------------------- the runtime


class _Recorder:
    """A stand-in inner runtime that records what each client was given to train on."""

    def __init__(self, current: dict[str, Any]) -> None:
        self.current, self.seen = current, []

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> list[ClientUpdate]:
        out = []
        for client, task in tasks.items():
            self.seen.append((task.plan.round, client, list(self.current[client])))
            out.append(ClientUpdate(client, task.plan.round, len(self.current[client]), {}))
        return out


def _task(client: str, round_num: int) -> ClientTask:
    return ClientTask(LocalPlan(round_num, [0.1], 1, 0), {}, ClientContext(client, round_num))


def test_runtime_trains_on_the_held_slices_plus_the_replay_of_earlier_ones(tmp_path: Path) -> None:
    config = ContinualConfig.model_validate(
        {"field": "t", "stream": "round", "slices": ["s1", "s2"], "mitigations": ["rehearsal"], "rehearsal": {"buffer_size": 2}}
    )
    examples = {"x": {"s1": ["a1", "a2", "a3"], "s2": ["b1", "b2"]}}
    data = ContinualData(["x"], {}, [], [], ["s1", "s2"], examples)
    stream = build_stream(config, ["x"], data.sizes(), rounds=3)
    current: dict[str, Any] = {}

    def run(rounds: range, store_root: Path) -> list[Any]:
        inner = _Recorder(current)
        runtime = ContinualRuntime(inner, stream, data, current, ClientStore(store_root), tmp_path / "none", config, seed=0)
        runtime.on_start({}, rounds.start - 1)
        for r in rounds:
            runtime.train_clients({"x": _task("x", r)})
        return inner.seen

    seen = run(range(1, 4), tmp_path / "a")
    assert seen[0] == (1, "x", ["a1", "a2", "a3"])  # stage 1: s1 alone, nothing to replay yet
    replayed = seen[1][2][2:]
    assert seen[1][2][:2] == ["b1", "b2"] and len(replayed) == 2 and set(replayed) <= {"a1", "a2", "a3"}
    assert seen[2][2][:2] == ["b1", "b2"] and set(seen[2][2][2:]) <= {"a1", "a2", "a3"}  # s2 is held: never replayed
    # resumed after round 1 (a crash left round 2 and 3 versions): the same data as the uninterrupted run
    resumed = run(range(2, 4), tmp_path / "a")
    assert resumed == seen[1:]


def test_yaml_integer_client_names_are_read_as_strings() -> None:
    config = ContinualConfig.model_validate({"schedule": {0: {"a": 1}}, "membership": {1: {"first": 2}}})
    assert config.schedule == {"0": {"a": 1}} and set(config.membership) == {"1"}
