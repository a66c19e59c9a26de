"""FedAvgM, FedAdagrad, FedAdam and FedYogi against hand-computed values, state round trips and bad parameters.

Every test uses the same three rounds on w_0 = (1, -2), with clients of different sizes (see ``_rounds``). Their
example-weighted mean deltas are worked out by hand once:

    round 1: n = (1, 3),    Delta_k = (2, 0), (-2, 4)            p = (1/4, 3/4)       mean = (-1, 3)
    round 2: n = (2, 2, 4), Delta_k = (4, 0), (0, 4), (2, -2)    p = (1/4, 1/4, 1/2)  mean = (2, 0)
    round 3: n = (3, 1),    Delta_k = (1, -1), (-3, -1)          p = (3/4, 1/4)       mean = (0, -1)

The expected values below are plain Python arithmetic on these numbers, never the code under test.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from fedlm.aggregation.base import Aggregator, build_aggregator, registered_aggregators
from fedlm.aggregation.fedopt import bias_corrected_eta
from fedlm.core.errors import FedlmError
from fedlm.core.update import ClientUpdate

OPTIMISERS = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")
W0 = (1.0, -2.0)
MEAN_DELTAS = ((-1.0, 3.0), (2.0, 0.0), (0.0, -1.0))


def _rounds() -> list[list[ClientUpdate]]:
    """The three rounds of the module docstring, as client updates of one tensor ``w`` of two elements."""
    spec = [
        [(1, (2.0, 0.0)), (3, (-2.0, 4.0))],
        [(2, (4.0, 0.0)), (2, (0.0, 4.0)), (4, (2.0, -2.0))],
        [(3, (1.0, -1.0)), (1, (-3.0, -1.0))],
    ]
    return [[ClientUpdate(f"c{i}", r, n, {"w": torch.tensor(d)}) for i, (n, d) in enumerate(clients)] for r, clients in enumerate(spec, start=1)]


def _run(agg: Aggregator, rounds: Sequence[Sequence[ClientUpdate]], start: Sequence[float] = W0) -> list[list[float]]:
    """Run ``agg`` over ``rounds`` from ``start``; the global ``w`` after each round."""
    params = {"w": torch.tensor(list(start))}
    out = []
    for updates in rounds:
        params = agg.aggregate(params, updates).params
        out.append(params["w"].tolist())
    return out


def _assert_rounds(got: Sequence[Sequence[float]], expected: Sequence[Sequence[float]]) -> None:
    for r, (g, e) in enumerate(zip(got, expected, strict=True), start=1):
        assert g == pytest.approx(e, rel=1e-6, abs=1e-6), f"round {r}"


def test_mean_deltas_of_the_scenario_are_as_computed_by_hand() -> None:
    agg = build_aggregator("fedavg", {})
    got = _run(agg, _rounds())
    # FedAvg: w_0 + (-1, 3) = (0, 1); + (2, 0) = (2, 1); + (0, -1) = (2, 0)
    _assert_rounds(got, [[0.0, 1.0], [2.0, 1.0], [2.0, 0.0]])


# ---------------------------------------------------------------- FedAvgM


def test_fedavgm_hand_computed() -> None:
    agg = build_aggregator("fedavgm", {"server_lr": 0.5, "momentum": 0.5})
    # v1 = (-1, 3);                       w1 = (1, -2) + 0.5 (-1, 3)           = (0.5, -0.5)
    # v2 = 0.5 (-1, 3) + (2, 0) = (1.5, 1.5);   w2 = (0.5, -0.5) + 0.5 (1.5, 1.5) = (1.25, 0.25)
    # v3 = 0.5 (1.5, 1.5) + (0, -1) = (0.75, -0.25); w3 = (1.25, 0.25) + 0.5 (0.75, -0.25) = (1.625, 0.125)
    _assert_rounds(_run(agg, _rounds()), [[0.5, -0.5], [1.25, 0.25], [1.625, 0.125]])


def test_fedavgm_nesterov_hand_computed() -> None:
    agg = build_aggregator("fedavgm", {"server_lr": 0.5, "momentum": 0.5, "nesterov": True})
    # step = 0.5 (0.5 v_t + Delta_t), v_t as in the test above:
    # r1: 0.5 (0.5 (-1, 3) + (-1, 3)) = (-0.75, 2.25)              -> w1 = (0.25, 0.25)
    # r2: 0.5 (0.5 (1.5, 1.5) + (2, 0)) = (1.375, 0.375)           -> w2 = (1.625, 0.625)
    # r3: 0.5 (0.5 (0.75, -0.25) + (0, -1)) = (0.1875, -0.5625)    -> w3 = (1.8125, 0.0625)
    _assert_rounds(_run(agg, _rounds()), [[0.25, 0.25], [1.625, 0.625], [1.8125, 0.0625]])


def test_fedavgm_without_momentum_and_unit_lr_is_fedavg() -> None:
    got = _run(build_aggregator("fedavgm", {"momentum": 0.0}), _rounds())
    _assert_rounds(got, [[0.0, 1.0], [2.0, 1.0], [2.0, 0.0]])


# ---------------------------------------------------------------- FedAdagrad


def test_fedadagrad_hand_computed() -> None:
    agg = build_aggregator("fedadagrad", {"eta": 0.1, "tau": 0.5})
    # beta1 = 0 so m_t = Delta_t; v_t = v_{t-1} + Delta_t^2 from v = 0.
    # r1: v = (1, 9):  w1 = (1 - 0.1 * 1 / (1 + 0.5), -2 + 0.1 * 3 / (3 + 0.5))   = (0.933333, -1.914286)
    # r2: v = (5, 9):  w2 = w1 + (0.1 * 2 / (sqrt(5) + 0.5), 0)                   = (1.006431, -1.914286)
    # r3: v = (5, 10): w3 = w2 + (0, -0.1 * 1 / (sqrt(10) + 0.5))                 = (1.006431, -1.941591)
    a1, b1 = 1.0 - 0.1 * 1.0 / 1.5, -2.0 + 0.1 * 3.0 / 3.5
    a2, b2 = a1 + 0.1 * 2.0 / (math.sqrt(5.0) + 0.5), b1
    a3, b3 = a2, b2 - 0.1 * 1.0 / (math.sqrt(10.0) + 0.5)
    expected = [[a1, b1], [a2, b2], [a3, b3]]
    _assert_rounds(expected, [[0.933333, -1.914286], [1.006431, -1.914286], [1.006431, -1.941591]])
    _assert_rounds(_run(agg, _rounds()), expected)


# ---------------------------------------------------------------- FedAdam

# beta1 = 0.5: m1 = 0.5 (-1, 3) = (-0.5, 1.5); m2 = 0.5 m1 + 0.5 (2, 0) = (0.75, 0.75); m3 = 0.5 m2 + 0.5 (0, -1)
# = (0.375, -0.125). The same m_t serve FedYogi below.
M = [(-0.5, 1.5), (0.75, 0.75), (0.375, -0.125)]
# beta2 = 0.75: v1 = 0.25 (1, 9) = (0.25, 2.25); v2 = 0.75 v1 + 0.25 (4, 0) = (1.1875, 1.6875);
# v3 = 0.75 v2 + 0.25 (0, 1) = (0.890625, 1.515625).
ADAM_V = [(0.25, 2.25), (1.1875, 1.6875), (0.890625, 1.515625)]


def _adaptive_expected(etas: Sequence[float], vs: Sequence[tuple[float, float]], tau: float) -> list[list[float]]:
    """w_t = w_{t-1} + eta_t m_t / (sqrt(v_t) + tau), elementwise, from W0 (plain floats)."""
    w, out = list(W0), []
    for eta, m, v in zip(etas, M, vs, strict=True):
        w = [w[i] + eta * m[i] / (math.sqrt(v[i]) + tau) for i in range(2)]
        out.append(w)
    return out


def test_fedadam_hand_computed() -> None:
    agg = build_aggregator("fedadam", {"eta": 0.1, "beta1": 0.5, "beta2": 0.75, "tau": 0.5})
    expected = _adaptive_expected([0.1, 0.1, 0.1], ADAM_V, tau=0.5)
    # r1: sqrt(v1) = (0.5, 1.5): w1 = (1 + 0.1 * -0.5 / 1.0, -2 + 0.1 * 1.5 / 2.0) = (0.95, -1.925)
    _assert_rounds(expected[:1], [[0.95, -1.925]])
    _assert_rounds(_run(agg, _rounds()), expected)


def test_fedadam_bias_correction_hand_computed() -> None:
    params = {"eta": 0.1, "beta1": 0.5, "beta2": 0.75, "tau": 0.5, "bias_correction": True}
    agg = build_aggregator("fedadam", params)
    # eta_t = 0.1 sqrt(1 - 0.75^t) / (1 - 0.5^t): t = 1: 0.1 * 0.5 / 0.5 = 0.1;
    # t = 2: 0.1 sqrt(0.4375) / 0.75 = 0.0881917; t = 3: 0.1 sqrt(0.578125) / 0.875 = 0.0868966
    etas = [0.1, 0.1 * math.sqrt(0.4375) / 0.75, 0.1 * math.sqrt(0.578125) / 0.875]
    assert etas[1:] == pytest.approx([0.0881917, 0.0868966], rel=1e-6)
    assert [bias_corrected_eta(0.1, 0.5, 0.75, t) for t in (1, 2, 3)] == pytest.approx(etas, rel=1e-12)
    _assert_rounds(_run(agg, _rounds()), _adaptive_expected(etas, ADAM_V, tau=0.5))


def test_bias_correction_needs_a_positive_step() -> None:
    with pytest.raises(ValueError, match="t >= 1"):
        bias_corrected_eta(0.1, 0.9, 0.99, 0)


# ---------------------------------------------------------------- FedYogi


def test_fedyogi_hand_computed_both_signs() -> None:
    params = {"eta": 0.1, "beta1": 0.5, "beta2": 0.99, "tau": 0.5, "initial_accumulator": 4.0}
    agg = build_aggregator("fedyogi", params)
    # v_t = v - 0.01 Delta^2 sign(v - Delta^2) from v = (4, 4):
    # r1: Delta^2 = (1, 9): 4 > 1 -> 4 - 0.01 = 3.99; 4 < 9 -> 4 + 0.09 = 4.09            v1 = (3.99, 4.09)
    # r2: Delta^2 = (4, 0): 3.99 < 4 -> 3.99 + 0.04 = 4.03; 4.09 > 0 -> 4.09 - 0 = 4.09   v2 = (4.03, 4.09)
    # r3: Delta^2 = (0, 1): 4.03 > 0 -> 4.03; 4.09 > 1 -> 4.09 - 0.01 = 4.08              v3 = (4.03, 4.08)
    vs = [(3.99, 4.09), (4.03, 4.09), (4.03, 4.08)]
    _assert_rounds(_run(agg, _rounds()), _adaptive_expected([0.1, 0.1, 0.1], vs, tau=0.5))


def test_fedyogi_from_zero_accumulator_first_round() -> None:
    agg = build_aggregator("fedyogi", {"eta": 0.1, "beta1": 0.5, "beta2": 0.75, "tau": 0.5})
    # v0 = 0 < Delta^2, so v1 = 0 + 0.25 Delta^2 = (0.25, 2.25), as Adam's first step: w1 = (0.95, -1.925)
    _assert_rounds(_run(agg, _rounds()[:1]), [[0.95, -1.925]])


# ---------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize("name", OPTIMISERS)
def test_state_round_trip_mid_run_continues_identically(name: str) -> None:
    rounds = _rounds()
    first = build_aggregator(name, {})
    params = {"w": torch.tensor(list(W0))}
    params = first.aggregate(params, rounds[0]).params
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as a checkpoint does
    buffer.seek(0)
    second = build_aggregator(name, {})
    second.load_state_dict(torch.load(buffer, weights_only=True))
    a, b = dict(params), dict(params)
    for updates in rounds[1:]:
        a, b = first.aggregate(a, updates).params, second.aggregate(b, updates).params
        assert torch.equal(a["w"], b["w"])
    _assert_state_equal(first.state_dict(), second.state_dict())


def _assert_state_equal(x: Mapping[str, Any], y: Mapping[str, Any]) -> None:
    assert set(x) == set(y)
    for key, value in x.items():
        if isinstance(value, Mapping):
            _assert_state_equal(value, y[key])
        else:
            assert isinstance(value, torch.Tensor) and torch.equal(value, y[key]), key


@pytest.mark.parametrize("name", OPTIMISERS)
def test_state_dict_is_a_copy_and_fresh_state_loads(name: str) -> None:
    agg = build_aggregator(name, {})
    fresh = agg.state_dict()
    agg.load_state_dict(fresh)
    agg.aggregate({"w": torch.tensor(list(W0))}, _rounds()[0])
    state = agg.state_dict()
    snapshot = copy.deepcopy(state)
    assert int(state["step"]) == 1
    for tensors in (v for v in state.values() if isinstance(v, Mapping)):
        for t in tensors.values():
            t.zero_()  # must not reach the aggregator
    _assert_state_equal(agg.state_dict(), snapshot)
    with pytest.raises(ValueError, match="unknown state keys"):
        agg.load_state_dict({**state, "bogus": torch.zeros(1)})


@pytest.mark.parametrize("name", OPTIMISERS)
def test_zero_updates_from_fresh_state_leave_params_unchanged(name: str) -> None:
    params = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([[0.5]])}
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    zeros = [ClientUpdate(f"c{i}", 1, n, zero) for i, n in enumerate((3, 5))]
    out = build_aggregator(name, {}).aggregate(params, zeros).params
    for k in params:
        assert torch.equal(out[k], params[k])


@pytest.mark.parametrize("name", OPTIMISERS)
def test_identical_updates_act_as_one(name: str) -> None:
    params = {"w": torch.tensor([1.0, -2.0])}
    delta = {"w": torch.tensor([0.3, -0.1])}
    many = [ClientUpdate(f"c{i}", 1, n, delta) for i, n in enumerate((2, 7, 11))]
    one = [ClientUpdate("c0", 1, 4, delta)]
    a = build_aggregator(name, {}).aggregate(params, many).params["w"]
    b = build_aggregator(name, {}).aggregate(params, one).params["w"]
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", OPTIMISERS)
def test_dtype_kept_and_metrics_reported(name: str) -> None:
    agg = build_aggregator(name, {})
    params = {"w": torch.tensor([1.0, -2.0], dtype=torch.bfloat16)}
    result = agg.aggregate(params, [ClientUpdate("c0", 1, 3, {"w": torch.tensor([0.5, 0.5])})])
    assert result.params["w"].dtype == torch.bfloat16
    assert {"num_updates", "update_norm", "server_step_norm", "server_step"} <= set(result.metrics)
    assert result.metrics["num_updates"] == 1.0
    assert result.metrics["update_norm"] == pytest.approx(math.sqrt(0.5))
    assert all(isinstance(v, float) for v in result.metrics.values())


@pytest.mark.parametrize("name", OPTIMISERS)
def test_changed_parameter_names_are_refused(name: str) -> None:
    agg = build_aggregator(name, {})
    agg.aggregate({"w": torch.tensor([1.0])}, [ClientUpdate("c0", 1, 1, {"w": torch.tensor([1.0])})])
    with pytest.raises(ValueError, match="must stay the same between rounds"):
        agg.aggregate({"u": torch.tensor([1.0])}, [ClientUpdate("c0", 2, 1, {"u": torch.tensor([1.0])})])


def test_optimisers_are_registered_with_documented_flags() -> None:
    names = registered_aggregators()
    for name in OPTIMISERS:
        assert name in names
        agg = build_aggregator(name, {})
        assert agg.returns_mean_update is False
        assert agg.needs_stable_parameter_space is False  # their state lives in the LoRA mode's stable space


def test_defaults() -> None:
    assert build_aggregator("fedavgm", {}).params.model_dump() == {"server_lr": 1.0, "momentum": 0.9, "nesterov": False}
    common = {"eta": 1e-2, "tau": 1e-3, "initial_accumulator": 0.0}
    assert build_aggregator("fedadagrad", {}).params.model_dump() == {**common, "beta1": 0.0}
    for name in ("fedadam", "fedyogi"):
        dumped = build_aggregator(name, {}).params.model_dump()
        assert dumped == {**common, "beta1": 0.9, "beta2": 0.99, "bias_correction": False}


@pytest.mark.parametrize(
    "name, params, field",
    [
        ("fedavgm", {"momentum": 1.0}, "momentum"),
        ("fedavgm", {"momentum": -0.1}, "momentum"),
        ("fedavgm", {"server_lr": -0.5}, "server_lr"),
        ("fedavgm", {"server_lr": 0.0}, "server_lr"),
        ("fedavgm", {"server_lr": float("inf")}, "server_lr"),
        ("fedadagrad", {"eta": -1e-2}, "eta"),
        ("fedadagrad", {"tau": 0.0}, "tau"),
        ("fedadagrad", {"beta1": 1.0}, "beta1"),
        ("fedadam", {"beta1": 1.0}, "beta1"),
        ("fedadam", {"beta2": 1.5}, "beta2"),
        ("fedadam", {"beta2": -0.1}, "beta2"),
        ("fedadam", {"tau": -1e-3}, "tau"),
        ("fedadam", {"eta": float("nan")}, "eta"),
        ("fedadam", {"initial_accumulator": -1.0}, "initial_accumulator"),
        ("fedyogi", {"tau": 0.0}, "tau"),
        ("fedyogi", {"beta1": 1.0}, "beta1"),
        ("fedyogi", {"eta": 0.0}, "eta"),
    ],
)
def test_bad_params_name_the_field(name: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(FedlmError, match=rf"aggregator '{name}': `aggregation\.{field}`: "):
        build_aggregator(name, params)


@pytest.mark.parametrize("field", ["beta2", "bias_correction"])
def test_fedadagrad_refuses_adam_only_params(field: str) -> None:
    with pytest.raises(FedlmError, match=rf"`aggregation\.{field}`: not a parameter"):
        build_aggregator("fedadagrad", {field: 0.9 if field == "beta2" else True})
