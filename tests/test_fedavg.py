"""FedAvg against hand-computed values, and the aggregator registry."""

from __future__ import annotations

import pytest
import torch

from fedlm.aggregation.base import build_aggregator, registered_aggregators
from fedlm.aggregation.fedavg import fedavg_step
from fedlm.core.errors import FedlmError
from fedlm.core.update import ClientUpdate


def test_fedavg_weighted_by_examples_hand_computed() -> None:
    params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    deltas = [{"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([3.0])}, {"w": torch.tensor([-2.0, 4.0]), "b": torch.tensor([0.0])}]
    # p = (1/4, 3/4): mean delta w = (0.25 - 1.5, 0 + 3) = (-1.25, 3); b = 0.75
    new = fedavg_step(params, deltas, [10, 30])
    assert torch.allclose(new["w"], torch.tensor([-0.25, 5.0]))
    assert torch.allclose(new["b"], torch.tensor([0.75]))


def test_fedavg_over_rounds_through_the_class() -> None:
    agg = build_aggregator("fedavg", {})
    state = {"w": torch.tensor([0.0])}
    for delta, expected in (([1.0, 3.0], 2.0), ([0.0, 6.0], 5.0)):
        updates = [ClientUpdate(str(i), 1, 5, {"w": torch.tensor([d])}) for i, d in enumerate(delta)]
        state = agg.aggregate(state, updates).params
        assert state["w"].item() == pytest.approx(expected)


def test_fedavg_keeps_dtype() -> None:
    params = {"w": torch.ones(3, dtype=torch.bfloat16)}
    new = fedavg_step(params, [{"w": torch.ones(3)}], [1])
    assert new["w"].dtype == torch.bfloat16


def test_unknown_aggregator_lists_valid_names() -> None:
    assert "fedavg" in registered_aggregators()
    with pytest.raises(FedlmError, match=r"`aggregation.name` 'fedavgg' is unknown; valid: .*fedavg"):
        build_aggregator("fedavgg", {})


def test_unknown_aggregator_parameter_is_refused() -> None:
    with pytest.raises(FedlmError, match=r"`aggregation.momentum`: not a parameter"):
        build_aggregator("fedavg", {"momentum": 0.9})
