"""Contract tests over every registered aggregator."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedlm.aggregation.base import AGGREGATORS, ByzantineBound, aggregator_class, build_aggregator, registered_aggregators
from fedlm.aggregation.lora import LORA_MODES
from fedlm.config.rules import check_config
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.core.update import ClientUpdate
from fedlm.federation.validation import Expectations, split_valid
from fedlm.privacy.client_dp import dp_compatible_aggregators

ALL = registered_aggregators()


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}


def _updates(n: int, seed: int = 1) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(f"c{i}", 1, 10 + 5 * i, {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}) for i in range(n)]


class _Reference:
    """For aggregators that need the server's own update (FLTrust): a fixed reference direction."""

    def __init__(self, agg) -> None:
        self.agg = agg

    def __getattr__(self, item):
        return getattr(self.agg, item)

    def aggregate(self, params, updates):
        if self.agg.needs_server_update:
            reference = {k: torch.full_like(v, 0.1) for k, v in params.items()}
            self.agg.set_server_update(ClientUpdate("server", 1, 1, reference))
        return self.agg.aggregate(params, updates)


def _build(name: str):
    agg = build_aggregator(name, {})
    agg.start([f"c{i}" for i in range(6)])
    return _Reference(agg)


@pytest.mark.parametrize("name", ALL)
def test_identical_clients_act_as_one_client(name: str) -> None:
    """K identical updates give what one such update gives; FedAvg-like aggregators return params + delta."""
    params = _params()
    delta = {k: torch.full_like(v, 0.1) for k, v in params.items()}
    updates = [ClientUpdate(f"c{i}", 1, 7, {k: v.clone() for k, v in delta.items()}) for i in range(3)]
    many = _build(name).aggregate(params, updates).params
    one = _build(name).aggregate(params, updates[:1]).params
    for k in params:
        assert torch.allclose(many[k], one[k], atol=1e-6)
        if _build(name).returns_mean_update:
            assert torch.allclose(many[k], params[k] + delta[k], atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_zero_updates_are_a_fixed_point(name: str) -> None:
    params = _params()
    agg = _build(name)
    for rnd in range(1, 3):
        zeros = [ClientUpdate(f"c{i}", rnd, 5 + i, {k: torch.zeros_like(v) for k, v in params.items()}) for i in range(3)]
        out = agg.aggregate(params, zeros).params
        for k in params:
            assert torch.equal(out[k], params[k])


@pytest.mark.parametrize("name", ALL)
def test_a_client_with_zero_weight_changes_nothing(name: str) -> None:
    params, updates = _params(), _updates(3)
    heavy = {k: 100 * torch.ones_like(v) for k, v in params.items()}
    with_zero = updates + [ClientUpdate("c5", 1, 0, heavy)]
    a = _build(name).aggregate(params, updates).params
    b = _build(name).aggregate(params, with_zero).params
    for k in params:
        assert torch.allclose(a[k], b[k], atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_client_order_does_not_matter(name: str) -> None:
    params, updates = _params(), _updates(4)
    forward = _build(name).aggregate(params, updates).params
    backward = _build(name).aggregate(params, updates[::-1]).params
    for k in params:
        assert torch.allclose(forward[k], backward[k], atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_state_survives_save_and_load(name: str) -> None:
    params = _params()
    first = _build(name)
    params = first.aggregate(params, _updates(3, 1)).params
    second = _build(name)
    second.load_state_dict(first.state_dict())
    a = first.aggregate(params, _updates(3, 2)).params
    b = second.aggregate(params, _updates(3, 2)).params
    for k in params:
        assert torch.equal(a[k], b[k])


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda u: ClientUpdate(u.client_id, u.round, u.num_examples, {**u.tensors, "a": torch.full((4, 3), float("nan"))}), "NaN"),
        (lambda u: ClientUpdate(u.client_id, u.round, u.num_examples, {"a": u.tensors["a"]}), "missing"),
        (lambda u: ClientUpdate(u.client_id, u.round, u.num_examples, {**u.tensors, "b": torch.zeros(6)}), "shape"),
        (lambda u: ClientUpdate(u.client_id, u.round, 0, u.tensors), "num_examples"),
        (lambda u: ClientUpdate(u.client_id, 0, u.num_examples, u.tensors), "round"),
        (lambda u: ClientUpdate("c0", u.round, u.num_examples, u.tensors), "second update"),
    ],
)
@pytest.mark.parametrize("name", ALL)
def test_bad_updates_are_rejected_and_the_rest_aggregated(name: str, mutate, reason: str) -> None:
    params, updates = _params(), _updates(3)
    bad = mutate(updates[1])
    accepted, rejected = split_valid([updates[0], bad, updates[2]], Expectations(1, params))
    assert [u.client_id for u in accepted] == ["c0", "c2"]
    assert len(rejected) == 1 and reason in rejected[0].reason
    out = _build(name).aggregate(params, accepted).params
    assert all(torch.isfinite(v).all() for v in out.values())


def _lora_round(name: str, mode_name: str, state, updates):
    from fedlm.aggregation.lora import build_lora_mode

    mode = build_lora_mode(mode_name, state, 4)
    space, mapped = mode.to_server_space(state, updates, {u.client_id: state for u in updates}, {})
    return mode.from_server_space(_build(name).aggregate(space, mapped).params, state)[0]


def _lora_state(mode_name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    state = {
        "m.lora_A.weight": torch.randn(4, 6, generator=g),
        "m.lora_B.weight": torch.randn(5, 4, generator=g),
        "bias": torch.randn(3, generator=g),
    }
    return {k: v for k, v in state.items() if not (mode_name == "ffa" and "lora_A" in k)}


def _fits(name: str, mode_name: str) -> bool:
    """The pairs the config rules accept: state kept on the factors needs a mode that aggregates the factors."""
    return LORA_MODES.get(mode_name).factor_space or not build_aggregator(name, {}).needs_stable_parameter_space


LORA_MATRIX = [(n, m) for n in ALL for m in LORA_MODES.names() if _fits(n, m)]


@pytest.mark.parametrize("name, mode_name", LORA_MATRIX)
def test_every_aggregator_works_through_every_lora_mode(name: str, mode_name: str) -> None:
    """Order invariance and the zero-update fixed point hold through each LoRA mode's mapping."""
    state = _lora_state(mode_name)
    g = torch.Generator().manual_seed(5)
    updates = [ClientUpdate(f"c{i}", 1, 5 + 3 * i, {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()}) for i in range(3)]
    forward = _lora_round(name, mode_name, state, updates)
    backward = _lora_round(name, mode_name, state, updates[::-1])
    zeros = [ClientUpdate(u.client_id, 1, u.num_examples, {k: torch.zeros_like(v) for k, v in state.items()}) for u in updates]
    still = _lora_round(name, mode_name, state, zeros)
    product = lambda s: s["m.lora_B.weight"] @ s.get("m.lora_A.weight", torch.ones(4, 6)) + s.get("m.lora_residual", 0)  # noqa: E731  # B A + R
    assert torch.allclose(product(forward), product(backward), atol=1e-5)
    assert torch.allclose(product(still), product(state), atol=1e-5)
    assert torch.allclose(forward["bias"], backward["bias"], atol=1e-6) and torch.allclose(still["bias"], state["bias"], atol=1e-6)


# Capabilities: every aggregator declares what it needs, and the config rules ask the capability, never the name.


def _config(name: str, privacy: dict[str, Any]) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "partition": {"method": "iid", "num_clients": 6, "field": None},
            "federation": {"clients_per_round": 6},
            "aggregation": {"name": name},
            "privacy": privacy,
        }
    )


PRIVACY = {"client_dp": {"noise_multiplier": 1.0}, "secure_aggregation": {}}


@pytest.mark.parametrize("name", ALL)
def test_capabilities_are_declared_with_their_types(name: str) -> None:
    cls = aggregator_class(name)
    for capability in ("needs_individual_updates", "uploads_extras"):
        reason = getattr(cls, capability)
        assert reason is None or (isinstance(reason, str) and len(reason) > 20), f"{name}.{capability} must say why"
    for flag in ("needs_server_update", "needs_stable_parameter_space", "returns_mean_update"):
        assert isinstance(getattr(cls, flag), bool)
    bound = cls.byzantine_bound
    if bound is not None:
        assert isinstance(bound, ByzantineBound) and bound.margin >= 0 and bound.source
        assert cls.needs_individual_updates is not None, "a Byzantine-robust rule must see the individual updates"
        assert bound.assumed_param is None or bound.assumed_param in cls.Params.model_fields


@pytest.mark.parametrize("privacy", sorted(PRIVACY))
@pytest.mark.parametrize("name", ALL)
def test_the_rules_refuse_exactly_the_aggregators_that_need_more_than_a_sum(name: str, privacy: str) -> None:
    """Client DP (one noised sum) and secure aggregation (only the sum) refuse an aggregator that declares it needs
    each update, uploads extras or needs the server's update, and accept every other one."""
    cls = aggregator_class(name)
    config = _config(name, {privacy: PRIVACY[privacy]})
    if cls.needs_individual_updates or cls.uploads_extras or cls.needs_server_update:
        with pytest.raises(FedlmError, match=f"`privacy.{privacy}`.*`aggregation.name: {name}`") as refused:
            check_config(config)
        reason = cls.needs_individual_updates or cls.uploads_extras
        assert reason is None or reason in str(refused.value)
    else:
        check_config(config)


def test_the_rules_follow_a_new_capability_not_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """An aggregator registered under a new name that declares ``needs_individual_updates`` is refused by both."""
    from fedlm.aggregation.fedavg import FedAvg

    class Picky(FedAvg):
        needs_individual_updates = "it reads each client's update one by one for this test"

    monkeypatch.setitem(AGGREGATORS._items, "picky_test_only", Picky)
    for privacy, value in PRIVACY.items():
        with pytest.raises(FedlmError, match="for this test"):
            check_config(_config("picky_test_only", {privacy: value}))
    check_config(_config("picky_test_only", {}))
    assert "picky_test_only" not in dp_compatible_aggregators()


def test_the_declared_needs_match_the_known_behaviour() -> None:
    """Pins what fedlm refuses under DP and secure aggregation, so a changed declaration is a visible decision."""
    needs = {n for n in ALL if aggregator_class(n).needs_individual_updates is not None}
    assert needs == {"krum", "multikrum", "median", "trimmed_mean", "flame", "fltrust", "scaffold"}
    assert {n for n in ALL if aggregator_class(n).uploads_extras is not None} == {"scaffold"}
    assert {n for n in ALL if aggregator_class(n).byzantine_bound is not None} == {"krum", "multikrum", "median", "trimmed_mean"}
