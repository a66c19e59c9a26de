"""LoRA-aware aggregation: exact reproduces the mean of the products, naive measurably does not, ffa is exact by
construction, heterogeneous ranks aggregate correctly, and the bytes on the wire follow the ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlm.aggregation.base import build_aggregator
from fedlm.aggregation.lora import build_lora_mode
from fedlm.aggregation.lora.client_ranks import resolve_client_ranks
from fedlm.aggregation.lora.mode import truncation_error
from fedlm.aggregation.lora.svd import factorise
from fedlm.aggregation.lora_structure import component_coverage, truncate_to_rank, wire_form
from fedlm.core.errors import FedlmError
from fedlm.core.update import ClientUpdate
from fedlm.federation.wire import serialized_bytes

A, B = "m.lora_A.weight", "m.lora_B.weight"
D_OUT, D_IN = 6, 5
SIZES = [10, 30, 20]  # p = 1/6, 1/2, 1/3


def _server_round(mode_name: str, state, updates, rank: int, ranks=None, aggregator: str = "fedavg"):
    """One server step through a LoRA mode: map, aggregate, map back."""
    ranks = ranks or {}
    mode = build_lora_mode(mode_name, state, rank)
    starts = {u.client_id: mode.download(state, ranks.get(u.client_id)) for u in updates}
    space, mapped = mode.to_server_space(state, updates, starts, ranks)
    agg = build_aggregator(aggregator, {})
    agg.start([u.client_id for u in updates])
    return mode.from_server_space(agg.aggregate(space, mapped).params, state)


def _clients(rank: int, seed: int = 0, state=None):
    """Three clients that train both factors from ``state`` (default: B = 0, A random), and their local (B_k, A_k)."""
    g = torch.Generator().manual_seed(seed)
    state = state or {A: torch.randn(rank, D_IN, generator=g), B: torch.zeros(D_OUT, rank)}
    updates, locals_ = [], []
    for k, n in enumerate(SIZES):
        d = {A: 0.5 * torch.randn(rank, D_IN, generator=g), B: torch.randn(D_OUT, rank, generator=g)}
        updates.append(ClientUpdate(f"c{k}", 1, n, d))
        locals_.append((state[B] + d[B], state[A] + d[A]))
    return state, updates, locals_


def _weights() -> list[float]:
    return [n / sum(SIZES) for n in SIZES]


def test_exact_reproduces_the_mean_of_the_products_when_the_rank_suffices() -> None:
    state, updates, locals_ = _clients(rank=5)  # rank 5 = min(d_out, d_in): any product is representable
    new, metrics = _server_round("exact", state, updates, rank=5)
    target = sum(p * b @ a for p, (b, a) in zip(_weights(), locals_))  # sum_k p_k B_k A_k
    assert torch.allclose(new[B] @ new[A], target, atol=1e-5)
    assert metrics["svd_rel_error"] < 1e-6


def test_naive_misses_the_mean_of_the_products_by_exactly_the_cross_terms() -> None:
    state, updates, locals_ = _clients(rank=5)
    new, _ = _server_round("naive", state, updates, rank=5)
    p = _weights()
    target = sum(w * b @ a for w, (b, a) in zip(p, locals_))
    b_bar = sum(w * b for w, (b, _) in zip(p, locals_))
    a_bar = sum(w * a for w, (_, a) in zip(p, locals_))
    assert torch.allclose(new[B] @ new[A], b_bar @ a_bar, atol=1e-5)
    # sum p_k B_k A_k - B_bar A_bar = sum p_k (B_k - B_bar)(A_k - A_bar): the cross terms naive averaging drops
    cross = sum(w * (b - b_bar) @ (a - a_bar) for w, (b, a) in zip(p, locals_))
    assert torch.allclose(target - new[B] @ new[A], cross, atol=1e-5)
    relative = float((target - new[B] @ new[A]).norm() / target.norm())
    assert relative > 0.1, f"naive should measurably miss the mean product, relative error {relative:.3f}"


def test_exact_truncation_error_is_the_eckart_young_tail() -> None:
    state, updates, locals_ = _clients(rank=2)  # three rank-2 products: their mean has rank up to 5 > 2
    new, metrics = _server_round("exact", state, updates, rank=2)
    target = sum(p * b @ a for p, (b, a) in zip(_weights(), locals_)).double().numpy()
    s = np.linalg.svd(target, compute_uv=False)
    expected = float(np.sqrt((s[2:] ** 2).sum() / (s**2).sum()))
    assert metrics["svd_rel_error"] == pytest.approx(expected, rel=1e-4)
    u, sv, vt = np.linalg.svd(target)
    best_rank_2 = (u[:, :2] * sv[:2]) @ vt[:2]
    assert np.allclose((new[B] @ new[A]).double().numpy(), best_rank_2, atol=1e-5)


def test_exact_keeps_factors_ordered_and_revives_dead_components() -> None:
    w = torch.outer(torch.arange(1.0, 7.0), torch.ones(D_IN))  # rank 1
    fact = factorise(w, 3)
    assert torch.allclose(fact.b @ fact.a, w, atol=1e-5)
    state = {A: torch.randn(3, D_IN), B: torch.zeros(D_OUT, 3)}
    mode = build_lora_mode("exact", state, 3)
    new, metrics = mode.from_server_space({"m.lora_product": w}, state)
    assert metrics["svd_revived_components"] == 2.0
    assert torch.equal(new[A][1:], state[A][1:]) and torch.equal(new[B][:, 1:], torch.zeros(D_OUT, 2))
    assert torch.allclose(new[B] @ new[A], w, atol=1e-5)


def test_ffa_is_exact_by_construction() -> None:
    g = torch.Generator().manual_seed(3)
    frozen_a = torch.randn(4, D_IN, generator=g)
    state = {B: torch.zeros(D_OUT, 4)}
    updates = [ClientUpdate(f"c{k}", 1, n, {B: torch.randn(D_OUT, 4, generator=g)}) for k, n in enumerate(SIZES)]
    new, _ = _server_round("ffa", state, updates, rank=4)
    target = sum(p * u.tensors[B] @ frozen_a for p, u in zip(_weights(), updates))
    assert torch.allclose(new[B] @ frozen_a, target, atol=1e-6)


def test_exact_with_heterogeneous_ranks_adds_each_clients_change_of_product() -> None:
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(D_OUT, D_IN, generator=g)
    fact = factorise(w0, 5)
    state = {A: fact.a, B: fact.b}  # a global adapter in SVD order, full rank 5
    ranks = {"c0": 2, "c1": 5, "c2": 3}
    mode = build_lora_mode("exact", state, 5)
    starts = {c: mode.download(state, r) for c, r in ranks.items()}
    updates = []
    for _k, (c, n) in enumerate(zip(ranks, SIZES)):
        d = truncate_to_rank({A: torch.randn(5, D_IN, generator=g), B: torch.randn(D_OUT, 5, generator=g)}, ranks[c])
        updates.append(ClientUpdate(c, 1, n, d))
    new, _ = _server_round("exact", state, updates, rank=5, ranks=ranks)
    change = sum(
        p * ((starts[u.client_id][B] + u.tensors[B]) @ (starts[u.client_id][A] + u.tensors[A]) - starts[u.client_id][B] @ starts[u.client_id][A])
        for p, u in zip(_weights(), updates)
    )
    assert torch.allclose(new[B] @ new[A], state[B] @ state[A] + change, atol=1e-4)


def test_download_cut_to_a_rank_keeps_the_best_approximation_and_reports_its_error() -> None:
    g = torch.Generator().manual_seed(6)
    w = torch.randn(D_OUT, D_IN, generator=g)
    fact = factorise(w, 5)
    state = {A: fact.a, B: fact.b}
    cut = truncate_to_rank(state, 2)
    assert torch.equal(cut[A][2:], torch.zeros(3, D_IN)) and torch.equal(cut[B][:, 2:], torch.zeros(D_OUT, 3))
    s = fact.singular_values.double()
    assert truncation_error(state, 2) == pytest.approx(float((s[2:].square().sum() / s.square().sum()).sqrt()), rel=1e-4)
    assert truncation_error(state, None) == 0.0


def test_naive_heterogeneous_ranks_average_each_component_over_the_clients_that_have_it() -> None:
    state = {A: torch.zeros(3, 1), B: torch.zeros(1, 3)}
    ranks = {"c0": 1, "c1": 3}
    updates = [
        ClientUpdate("c0", 1, 10, {A: torch.tensor([[1.0], [0.0], [0.0]]), B: torch.tensor([[2.0, 0.0, 0.0]])}),
        ClientUpdate("c1", 1, 30, {A: torch.tensor([[5.0], [4.0], [8.0]]), B: torch.tensor([[6.0, 3.0, 9.0]])}),
    ]
    new, _ = _server_round("naive", state, updates, rank=3, ranks=ranks)
    # component 0: both clients, weights 1/4, 3/4 -> A 0.25*1 + 0.75*5 = 4.0, B 0.25*2 + 0.75*6 = 5.0
    # components 1, 2: only c1 has them -> its values, not pulled toward zero by c0's padding
    assert torch.allclose(new[A].flatten(), torch.tensor([4.0, 4.0, 8.0]))
    assert torch.allclose(new[B].flatten(), torch.tensor([5.0, 3.0, 9.0]))
    assert torch.allclose(component_coverage([1, None], [0.25, 0.75], 3), torch.tensor([1.0, 0.75, 0.75]))


def test_ffa_heterogeneous_ranks_stay_exact_with_plain_padding() -> None:
    frozen_a = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(8))
    state = {B: torch.zeros(D_OUT, 4)}
    ranks = {"c0": 1, "c1": 4, "c2": 2}
    g = torch.Generator().manual_seed(9)
    updates = [ClientUpdate(c, 1, n, truncate_to_rank({B: torch.randn(D_OUT, 4, generator=g)}, r)) for (c, r), n in zip(ranks.items(), SIZES)]
    new, _ = _server_round("ffa", state, updates, rank=4, ranks=ranks)
    target = sum(p * u.tensors[B][:, : ranks[u.client_id]] @ frozen_a[: ranks[u.client_id]] for p, u in zip(_weights(), updates))
    assert torch.allclose(new[B] @ frozen_a, target, atol=1e-6)


def test_wire_form_and_bytes_follow_the_rank() -> None:
    state = {A: torch.randn(8, 64), B: torch.randn(32, 8), "bias": torch.randn(3)}
    cut = wire_form(state, 2)
    assert cut[A].shape == (2, 64) and cut[B].shape == (32, 2) and cut["bias"].shape == (3,)
    full, small = serialized_bytes(state), serialized_bytes(cut)
    payload = 4 * (8 * 64 + 32 * 8 + 3), 4 * (2 * 64 + 32 * 2 + 3)
    assert payload[0] < full < payload[0] + 512 and payload[1] < small < payload[1] + 512
    b_only = serialized_bytes({B: state[B]})
    assert b_only < full / 2  # ffa: B only


def test_client_ranks_resolve_from_a_list_or_a_mapping() -> None:
    assert resolve_client_ranks([2, 8], ["x", "y"], 8) == {"x": 2, "y": None}
    assert resolve_client_ranks({"y": 4}, ["x", "y"], 8) == {"x": None, "y": 4}
    with pytest.raises(FedlmError, match=r"`peft.client_ranks` has 1 entries but the federation has 2 clients"):
        resolve_client_ranks([2], ["x", "y"], 8)
    with pytest.raises(FedlmError, match="unknown clients"):
        resolve_client_ranks({"z": 2}, ["x", "y"], 8)


@pytest.mark.parametrize("aggregator", ["fedadam", "fedavgm", "fedyogi"])
def test_server_optimisers_run_in_the_exact_product_space(aggregator: str) -> None:
    state, updates, _ = _clients(rank=5)
    mode = build_lora_mode("exact", state, 5)
    agg = build_aggregator(aggregator, {})
    for _rnd in (1, 2):
        starts = {u.client_id: state for u in updates}
        space, mapped = mode.to_server_space(state, updates, starts, {})
        result = agg.aggregate(space, mapped)
        assert set(result.params) == {"m.lora_product"}
        state, metrics = mode.from_server_space(result.params, state)
        assert torch.allclose(state[B] @ state[A], result.params["m.lora_product"], atol=1e-4)  # rank 5: exact
        assert metrics["svd_rel_error"] < 1e-5
    assert set(agg.state_dict()) and all(torch.isfinite(t).all() for t in state.values())
