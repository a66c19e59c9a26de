"""FedEx-LoRA, FLoRA and RoLoRA (``aggregation.lora: fedex | flora | rolora``) in closed form.

For each mode: one client gives that client's local model; identical clients give one client; and the mode's own
exactness claim: FedEx-LoRA's model is W0 + s mean(B_k A_k) exactly, FLoRA's stacked product is the weighted sum of
the client products, RoLoRA's alternating rounds average the trained factor exactly (and a server optimiser's
momentum never moves the frozen one). The residual is checked through a real peft model: its forward pass, and the
exported adapter loaded back by ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedlm.aggregation.base import build_aggregator
from fedlm.aggregation.lora import build_lora_mode
from fedlm.aggregation.lora.flora import stack_lora
from fedlm.aggregation.lora_structure import RESIDUAL_SUFFIX
from fedlm.core.task import LocalPlan
from fedlm.core.update import ClientUpdate
from fedlm.federation.trainer import frozen_factor
from fedlm.models.adapters import load_trainable_state, named_trainable_parameters, save_adapter, trainable_state

A, B, R = "m.lora_A.weight", "m.lora_B.weight", "m" + RESIDUAL_SUFFIX
D_OUT, D_IN, RANK = 6, 5, 2
SIZES = [10, 30, 20]


def _weights(sizes=SIZES) -> list[float]:
    return [n / sum(sizes) for n in sizes]


def _state(seed: int = 0, residual: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {A: torch.randn(RANK, D_IN, generator=g), B: 0.3 * torch.randn(D_OUT, RANK, generator=g), "bias": torch.randn(3, generator=g)}
    if residual:
        state[R] = 0.1 * torch.randn(D_OUT, D_IN, generator=g)
    return state


def _updates(state, sizes=SIZES, seed: int = 1, frozen: str | None = None) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(sizes):
        d = {A: 0.5 * torch.randn(RANK, D_IN, generator=g), B: torch.randn(D_OUT, RANK, generator=g), "bias": torch.randn(3, generator=g)}
        if frozen is not None:
            d[frozen] = torch.zeros_like(d[frozen])
        out.append(ClientUpdate(f"c{k}", 1, n, d))
    return out


def _round(mode_name: str, state, updates, aggregator: str = "fedavg", round_num: int = 1, mode=None, agg=None):
    mode = mode or build_lora_mode(mode_name, state, RANK)
    mode.begin_round(round_num)
    starts = {u.client_id: mode.download(state, None) for u in updates}
    space, mapped = mode.to_server_space(state, updates, starts, {})
    if agg is None:
        agg = build_aggregator(aggregator, {})
        agg.start([u.client_id for u in updates])
    return mode.from_server_space(agg.aggregate(space, mapped).params, state)


def _effective(state) -> torch.Tensor:
    """B A + R: what the module adds to W0 x, over the scale alpha / r."""
    product = state[B] @ state[A] if A in state else state[B] @ torch.ones(RANK, D_IN)
    return product + state.get(R, torch.zeros(D_OUT, D_IN))


def _local(state, update) -> dict[str, torch.Tensor]:
    return {**state, **{n: state[n] + d for n, d in update.tensors.items()}}


# ---------------------------------------------------------------------------------------------------- FedEx-LoRA


def test_fedex_model_is_the_mean_of_the_client_products_exactly() -> None:
    state = _state()
    updates = _updates(state)
    new, metrics = _round("fedex", state, updates)
    target = sum(p * _effective(_local(state, u)) for p, u in zip(_weights(), updates))  # R + sum_k p_k B_k A_k
    assert torch.allclose(_effective(new), target, atol=1e-5)
    mean_a = sum(p * (state[A] + u.tensors[A]) for p, u in zip(_weights(), updates))
    mean_b = sum(p * (state[B] + u.tensors[B]) for p, u in zip(_weights(), updates))
    assert torch.allclose(new[A], mean_a, atol=1e-6) and torch.allclose(new[B], mean_b, atol=1e-6)  # the factors: FedAvg
    # the residual holds exactly what the averaged factors miss: mean(B_k A_k) - mean(B) mean(A)
    mean_product = sum(p * (state[B] + u.tensors[B]) @ (state[A] + u.tensors[A]) for p, u in zip(_weights(), updates))
    assert torch.allclose(new[R] - state[R], mean_product - mean_b @ mean_a, atol=1e-5)
    assert metrics["fedex_cross_term"] > 0.05  # naive would have lost this share of the round's change


def test_fedex_one_client_equals_local_training_and_identical_clients_equal_one() -> None:
    state = _state()
    (one,) = _updates(state, sizes=[7])
    alone, metrics = _round("fedex", state, [one])
    local = _local(state, one)
    for name in (A, B, "bias"):
        assert torch.allclose(alone[name], local[name], atol=1e-6)
    assert torch.allclose(alone[R], state[R], atol=1e-5)  # nothing missed: the residual does not move
    assert metrics["fedex_cross_term"] < 1e-5
    same = [ClientUpdate(f"c{k}", 1, n, one.tensors) for k, n in enumerate(SIZES)]
    together, _ = _round("fedex", state, same)
    for name in alone:
        assert torch.allclose(together[name], alone[name], atol=1e-5), name


def test_fedex_starts_a_residual_where_the_state_had_none() -> None:
    state = _state(residual=False)
    updates = _updates(state)
    new, _ = _round("fedex", state, updates)
    target = sum(p * _effective(_local(state, u)) for p, u in zip(_weights(), updates))
    assert R in new and torch.allclose(_effective(new), target, atol=1e-5)


# --------------------------------------------------------------------------------------------------------- FLoRA


def test_flora_merges_the_stacked_product_and_restarts_lora() -> None:
    state = _state()
    updates = _updates(state)
    new, _ = _round("flora", state, updates)
    locals_ = [(state[B] + u.tensors[B], state[A] + u.tensors[A]) for u in updates]
    b_stack, a_stack = stack_lora(locals_, _weights())
    assert b_stack.shape == (D_OUT, 3 * RANK) and a_stack.shape == (3 * RANK, D_IN)  # global rank = sum of client ranks
    weighted = sum(p * b @ a for p, (b, a) in zip(_weights(), locals_))
    assert torch.allclose(b_stack @ a_stack, weighted, atol=1e-5)
    # what the server merged this round is the stacked product (the clients' products include the B A they started
    # from, which the restart drops from the factors)
    assert torch.allclose(new[R] - state[R], b_stack @ a_stack, atol=1e-5)
    assert torch.equal(new[A], state[A]) and torch.equal(new[B], torch.zeros_like(state[B]))  # fresh modules (A_0, 0)


def test_flora_heterogeneous_ranks_stack_each_clients_own_rank() -> None:
    init = {A: torch.randn(RANK, D_IN, generator=torch.Generator().manual_seed(3)), B: torch.zeros(D_OUT, RANK)}
    mode = build_lora_mode("flora", init, RANK)
    ranks = {"c0": 1, "c1": None, "c2": 1}
    g = torch.Generator().manual_seed(4)
    updates, locals_ = [], []
    for k, n in enumerate(SIZES):
        start = mode.download(init, ranks[f"c{k}"])
        r = ranks[f"c{k}"] or RANK
        d = {A: torch.zeros(RANK, D_IN), B: torch.zeros(D_OUT, RANK)}
        d[A][:r] = torch.randn(r, D_IN, generator=g)
        d[B][:, :r] = torch.randn(D_OUT, r, generator=g)
        updates.append(ClientUpdate(f"c{k}", 1, n, d))
        locals_.append(((start[B] + d[B])[:, :r], (start[A] + d[A])[:r]))  # the client's own rank-r_k module
    starts = {u.client_id: mode.download(init, ranks[u.client_id]) for u in updates}
    space, mapped = mode.to_server_space(init, updates, starts, ranks)
    new, _ = mode.from_server_space(build_aggregator("fedavg", {}).aggregate(space, mapped).params, init)
    b_stack, a_stack = stack_lora(locals_, _weights())
    assert a_stack.shape[0] == 1 + RANK + 1
    assert torch.allclose(new[R], b_stack @ a_stack, atol=1e-5)


def test_flora_one_client_equals_local_training_and_identical_clients_equal_one() -> None:
    state = _state()
    (one,) = _updates(state, sizes=[7])
    alone, _ = _round("flora", state, [one])
    assert torch.allclose(_effective(alone), _effective(_local(state, one)), atol=1e-5)
    same = [ClientUpdate(f"c{k}", 1, n, one.tensors) for k, n in enumerate(SIZES)]
    together, _ = _round("flora", state, same)
    for name in alone:
        assert torch.allclose(together[name], alone[name], atol=1e-5), name


# -------------------------------------------------------------------------------------------------------- RoLoRA


def test_rolora_trains_b_in_odd_rounds_and_a_in_even_ones() -> None:
    mode = build_lora_mode("rolora", _state(residual=False), RANK)
    assert [mode.frozen_factor(t) for t in (1, 2, 3, 4)] == ["A", "B", "A", "B"]


@pytest.mark.parametrize(("round_num", "frozen"), [(1, A), (2, B)])
def test_rolora_rounds_average_exactly(round_num: int, frozen: str) -> None:
    state = _state(residual=False)
    updates = _updates(state, frozen=frozen)
    new, _ = _round("rolora", state, updates, round_num=round_num)
    target = sum(p * (state[B] + u.tensors[B]) @ (state[A] + u.tensors[A]) for p, u in zip(_weights(), updates))
    assert torch.allclose(new[B] @ new[A], target, atol=1e-5)  # mean of the products = product of the means
    assert torch.equal(new[frozen], state[frozen])
    naive, _ = _round("naive", state, _updates(state))  # both trained: the cross terms make it inexact
    both = _updates(state)
    naive_target = sum(p * (state[B] + u.tensors[B]) @ (state[A] + u.tensors[A]) for p, u in zip(_weights(), both))
    assert not torch.allclose(naive[B] @ naive[A], naive_target, atol=1e-2)


def test_rolora_keeps_the_frozen_factor_under_server_momentum() -> None:
    """FedAdam's momentum on B from round 1 would move B in round 2 (its delta 0); RoLoRA puts B back."""
    state = _state(residual=False)
    mode = build_lora_mode("rolora", state, RANK)
    agg = build_aggregator("fedadam", {})
    agg.start(["c0", "c1", "c2"])
    first, _ = _round("rolora", state, _updates(state, frozen=A), mode=mode, agg=agg, round_num=1)
    assert torch.equal(first[A], state[A]) and not torch.equal(first[B], state[B])
    second_updates = [ClientUpdate(u.client_id, 2, u.num_examples, u.tensors) for u in _updates(first, seed=5, frozen=B)]
    second, _ = _round("rolora", first, second_updates, mode=mode, agg=agg, round_num=2)
    assert torch.equal(second[B], first[B]) and not torch.equal(second[A], first[A])


def test_rolora_one_client_equals_local_training_and_identical_clients_equal_one() -> None:
    state = _state(residual=False)
    (one,) = _updates(state, sizes=[7], frozen=A)
    alone, _ = _round("rolora", state, [one])
    local = _local(state, one)
    for name in (A, B, "bias"):
        assert torch.allclose(alone[name], local[name], atol=1e-6)
    same = [ClientUpdate(f"c{k}", 1, n, one.tensors) for k, n in enumerate(SIZES)]
    together, _ = _round("rolora", state, same)
    for name in alone:
        assert torch.allclose(together[name], alone[name], atol=1e-6), name


def test_frozen_factor_leaves_the_factor_out_of_training_and_restores_it() -> None:
    model = _peft_model()
    every = named_trainable_parameters(model)
    with frozen_factor(every, "A") as named:
        assert named and all(".lora_A." not in n for n in named)
        assert all(not p.requires_grad for n, p in every.items() if ".lora_A." in n)
    assert all(p.requires_grad for p in every.values())
    assert LocalPlan(1, [0.1], 2, 0).frozen is None


# ------------------------------------------------------------------------------------------ residual in a model


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(D_IN, D_OUT, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _peft_model(seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    return get_peft_model(_Net(), LoraConfig(r=RANK, lora_alpha=4, target_modules=["proj"], lora_dropout=0.0))  # type: ignore[return-value]


def _model_state(model: PeftModel, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {n: torch.randn(t.shape, generator=g) for n, t in trainable_state(model).items()}
    module = next(n.removesuffix(".lora_A.weight") for n in state if n.endswith(".lora_A.weight"))
    state[module + RESIDUAL_SUFFIX] = torch.randn(D_OUT, D_IN, generator=g)
    return state


def test_the_residual_is_part_of_the_models_weight() -> None:
    """W0 x + s (B A + R) x through the model, and W0 + s mean(B_k A_k) after a FedEx-LoRA round."""
    model = _peft_model()
    w0 = model.base_model.model.proj.base_layer.weight.detach().clone()
    state = _model_state(model)
    names = {"R" if k.endswith(RESIDUAL_SUFFIX) else k.split(".")[-2]: k for k in state}
    a, b, r = state[names["lora_A"]], state[names["lora_B"]], state[names["R"]]
    scale = 4 / RANK
    x = torch.randn(3, D_IN)
    load_trainable_state(model, state)
    with torch.no_grad():
        assert torch.allclose(model(x), x @ (w0 + scale * (b @ a + r)).T, atol=1e-5)
        load_trainable_state(model, {k: v for k, v in state.items() if k != names["R"]})  # a state without it
        assert torch.allclose(model(x), x @ (w0 + scale * (b @ a)).T, atol=1e-5)
        with model.disable_adapter():
            assert torch.allclose(model(x), x @ w0.T, atol=1e-6)


def test_fedex_round_gives_the_model_w0_plus_the_mean_product(tmp_path: Path) -> None:
    model = _peft_model()
    w0 = model.base_model.model.proj.base_layer.weight.detach().clone()
    state = {n: t for n, t in _model_state(model).items() if "residual" not in n}
    a_name, b_name = (next(n for n in state if n.endswith(suffix)) for suffix in (".lora_A.weight", ".lora_B.weight"))
    g = torch.Generator().manual_seed(8)
    updates = [ClientUpdate(f"c{k}", 1, n, {name: torch.randn(t.shape, generator=g) for name, t in state.items()}) for k, n in enumerate(SIZES)]
    mode = build_lora_mode("fedex", state, RANK)
    space, mapped = mode.to_server_space(state, updates, {u.client_id: state for u in updates}, {})
    new, _ = mode.from_server_space(build_aggregator("fedavg", {}).aggregate(space, mapped).params, state)
    mean_product = sum(p * (state[b_name] + u.tensors[b_name]) @ (state[a_name] + u.tensors[a_name]) for p, u in zip(_weights(), updates))
    x = torch.randn(4, D_IN)
    load_trainable_state(model, new)
    with torch.no_grad():
        assert torch.allclose(model(x), x @ (w0 + (4 / RANK) * mean_product).T, atol=1e-4)
        expected = model(x)
    save_adapter(model, new, tmp_path / "adapter")  # the residual saved as extra LoRA rank
    base = _Net()
    base.proj.weight.data.copy_(w0)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.allclose(reloaded(x), expected, atol=1e-4)
    assert reloaded.base_model.model.proj.lora_A["default"].weight.shape[0] > RANK
