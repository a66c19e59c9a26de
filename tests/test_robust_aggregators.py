"""Robust aggregators: hand-computed values, Flower's robust strategies, LoRA product geometry, bad parameters.

Flower (flwr 1.41) receives local models (its current global + delta) and fedlm the deltas; the median, trimmed
mean and Krum of models w + Delta_k equal w plus those of the deltas, and distances between models equal distances
between deltas (non-LoRA names, so fedlm's LoRA product view is the identity). Flower's Multi-Krum averages the
kept models with example weights, as fedlm, so random ``num_examples`` are used throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedMedian, FedTrimmedAvg, Krum, Strategy

from fedlm.aggregation.base import Aggregator, build_aggregator
from fedlm.aggregation.lora.exact import product_delta
from fedlm.aggregation.robust.geometry import distance_view, norms, pairwise_sq_distances
from fedlm.aggregation.robust.krum import krum_scores, krum_select
from fedlm.aggregation.robust.median import coordinate_median
from fedlm.aggregation.robust.trimmed_mean import coordinate_trimmed_mean, trim_count
from fedlm.core.errors import FedlmError
from fedlm.core.update import ClientUpdate

T = torch.tensor


def _split(vectors: Sequence[Sequence[float]], sizes: Sequence[int] | None = None) -> list[ClientUpdate]:
    """Client c<i> sends vector i, its first coordinate as tensor ``x`` and the rest as ``y``."""
    sizes = sizes or [1] * len(vectors)
    return [ClientUpdate(f"c{i}", 1, n, {"x": T(v[:1]), "y": T(v[1:])}) for i, (v, n) in enumerate(zip(vectors, sizes))]


def _zeros(dim: int) -> dict[str, torch.Tensor]:
    return {"x": torch.zeros(1), "y": torch.zeros(dim - 1)}


def _joined(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params["x"], params["y"]])


# --- closed form -------------------------------------------------------------------------------------------------


def test_median_odd_and_even_hand_computed() -> None:
    odd = [{"w": T([1.0, -5.0])}, {"w": T([3.0, 0.0])}, {"w": T([100.0, 2.0])}]
    assert torch.equal(coordinate_median(odd)["w"], T([3.0, 0.0]))
    even = [*odd, {"w": T([2.0, 7.0])}]  # sorted columns (1, 2, 3, 100) and (-5, 0, 2, 7)
    assert torch.equal(coordinate_median(even)["w"], T([2.5, 1.0]))


def test_trimmed_mean_odd_and_even_hand_computed() -> None:
    five = [{"w": T([v])} for v in (10.0, -3.0, 1.0, 2.0, 6.0)]
    assert trim_count(5, 0.2) == 1 and coordinate_trimmed_mean(five, 0.2)["w"].item() == pytest.approx(3.0)  # (1+2+6)/3
    assert coordinate_trimmed_mean(five, 0.1)["w"].item() == pytest.approx(3.2)  # int(0.5) = 0: plain mean
    four = five[:4]  # sorted -3, 1, 2, 10
    assert coordinate_trimmed_mean(four, 0.25)["w"].item() == pytest.approx(1.5)
    assert coordinate_trimmed_mean(four, 0.49)["w"].item() == pytest.approx(1.5)  # int(1.96) = 1
    assert trim_count(100, 0.29) == int(0.29 * 100) == 28  # the float product, as Flower's _trim_mean


def test_median_aggregator_steps_and_leaves_out_empty_clients() -> None:
    updates = _split([[1.0, 4.0], [2.0, -1.0], [9.0, 0.0]]) + [ClientUpdate("z", 1, 0, {"x": T([50.0]), "y": T([50.0])})]
    out = build_aggregator("median", {"server_lr": 0.5}).aggregate({"x": T([1.0]), "y": T([1.0])}, updates)
    assert torch.allclose(_joined(out.params), T([2.0, 1.0]))  # 1 + 0.5 * (2, 0)
    assert out.excluded == ["z"] and out.metrics["num_updates"] == 3


# Five clients as (x, y); squared distances a-b 1, a-c 4, a-d 2, a-e 200, b-c 5, b-d 1, b-e 181, c-d 2, c-e 164,
# d-e 162. With f = 1 each score sums the K - f - 2 = 2 nearest: a 1+2=3, b 1+1=2, c 2+4=6, d 1+2=3, e 162+164=326.
KRUM_VECTORS = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [10.0, 10.0]]


def test_krum_scores_and_selection_hand_computed() -> None:
    views = [{"x": T(v[:1]), "y": T(v[1:])} for v in KRUM_VECTORS]
    distances = pairwise_sq_distances(views)
    assert distances[0, 4].item() == 200 and distances[2, 4].item() == 164
    assert krum_scores(distances, 1).tolist() == [3.0, 2.0, 6.0, 3.0, 326.0]
    assert krum_select(distances, 1, 1) == [1]
    assert krum_select(distances, 1, 3) == [0, 1, 3]


def test_krum_and_multikrum_aggregators_hand_computed() -> None:
    updates = _split(KRUM_VECTORS, sizes=[10, 30, 5, 60, 1000])
    krum = build_aggregator("krum", {"num_malicious": 1, "server_lr": 0.5}).aggregate(_zeros(2), updates)
    assert torch.allclose(_joined(krum.params), T([0.5, 0.0]))
    assert krum.excluded == ["c0", "c2", "c3", "c4"] and krum.client_weights == {"c1": 1.0}
    multi = build_aggregator("multikrum", {"num_malicious": 1, "num_selected": 3}).aggregate(_zeros(2), updates)
    # example weights 10/100, 30/100, 60/100 over a, b, d: 0.1 (0, 0) + 0.3 (1, 0) + 0.6 (1, 1)
    assert torch.allclose(_joined(multi.params), T([0.9, 0.6]))
    assert multi.excluded == ["c2", "c4"] and multi.client_weights == pytest.approx({"c0": 0.1, "c1": 0.3, "c3": 0.6})
    default = build_aggregator("multikrum", {"num_malicious": 1}).aggregate(_zeros(2), updates)
    assert default.metrics["num_selected"] == 4 and default.excluded == ["c4"]  # m = K - f


def test_krum_refuses_a_round_too_small_for_its_guarantee() -> None:
    agg = build_aggregator("krum", {"num_malicious": 1})
    with pytest.raises(FedlmError, match=r"num_malicious` f = 1 needs more than 2f \+ 2 = 4 updates .* got K = 4"):
        agg.aggregate(_zeros(2), _split(KRUM_VECTORS[:4]))


def test_norm_bound_hand_computed() -> None:
    # norms 5 (clipped by 1/5 to (0.6, 0.8)) and 0.5 (kept); example weights 1/4 and 3/4
    out = build_aggregator("norm_bound", {"max_norm": 1.0}).aggregate(_zeros(2), _split([[3.0, 4.0], [0.3, 0.4]], [1, 3]))
    assert torch.allclose(_joined(out.params), T([0.25 * 0.6 + 0.75 * 0.3, 0.25 * 0.8 + 0.75 * 0.4]))
    assert out.metrics["num_clipped"] == 1 and out.metrics["update_norm_max"] == pytest.approx(5.0)
    assert out.client_weights == pytest.approx({"c0": 0.25 * 0.2, "c1": 0.75})


def _flame_scenario() -> tuple[list[list[float]], list[float]]:
    """Six honest updates s_k (u + 0.1 e_k) and two flipped, boosted ones -5 (u + 0.1 e_j), u = ones(8).

    All honest pairs have the same cosine distance, so HDBSCAN merges them at one level (none falls out as noise).
    """
    scales = [1.0, 1.0, 1.0, 2.0, 2.0, 3.0, -5.0, -5.0]
    vectors = [[s * (1.0 + (0.1 if j == k else 0.0)) for j in range(8)] for k, s in enumerate(scales)]
    return vectors, scales


def test_flame_excludes_a_flipped_minority_and_clips_to_the_median_norm() -> None:
    vectors, scales = _flame_scenario()
    out = build_aggregator("flame", {"noise_lambda": 0.0}).aggregate(_zeros(8), _split(vectors, [7] * 8))
    assert out.excluded == ["c6", "c7"] and out.metrics["num_selected"] == 6
    unit = math.sqrt(7 + 1.1**2)  # ||u + 0.1 e_k||
    assert out.metrics["median_norm"] == pytest.approx(2 * unit)  # norms (1, 1, 1, 2, 2, 3, 5, 5) * unit
    clipped = [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]  # the scale 3 update clipped by 2/3
    expected = sum(s * T(v) / abs(sc) for s, v, sc in zip(clipped, vectors, scales)) / 6
    assert torch.allclose(_joined(out.params), expected, atol=1e-6)
    assert out.client_weights == pytest.approx({f"c{k}": w / 6 for k, w in enumerate([1, 1, 1, 1, 1, 2 / 3])})


def test_flame_noise_is_lambda_times_the_median_norm_and_seeded_by_round() -> None:
    vectors, _ = _flame_scenario()
    updates = _split(vectors, [7] * 8)
    start = {"x": torch.zeros(1), "y": torch.zeros(2000)}
    padded = [{"x": u.tensors["x"], "y": torch.cat([u.tensors["y"], torch.zeros(1993)])} for u in updates]
    updates = [ClientUpdate(u.client_id, 1, 7, t) for u, t in zip(updates, padded)]
    clean = build_aggregator("flame", {"noise_lambda": 0.0}).aggregate(start, updates).params
    agg = build_aggregator("flame", {"noise_lambda": 0.01, "seed": 3})
    first = agg.aggregate(start, updates)
    second = agg.aggregate(start, updates).params
    sigma = first.metrics["noise_sigma"]
    assert sigma == pytest.approx(0.01 * first.metrics["median_norm"])
    noise = _joined(first.params) - _joined(clean)
    assert float(noise.std()) == pytest.approx(sigma, rel=0.1)
    assert not torch.equal(first.params["y"], second["y"])  # a new draw each round
    again = build_aggregator("flame", {"noise_lambda": 0.01, "seed": 3}).aggregate(start, updates).params
    assert torch.equal(first.params["y"], again["y"])


# --- against Flower ----------------------------------------------------------------------------------------------

SHAPES = {"a": (3, 2), "b": (4,)}
NAMES = sorted(SHAPES)
Arrays = dict[str, np.ndarray]
Round = list[tuple[int, Arrays]]


def _scenario(seed: int, clients_per_round: Sequence[int]) -> tuple[Arrays, list[Round]]:
    """A float32-representable start and rounds of deltas (one boosted outlier per round), random sizes."""
    rng = np.random.default_rng(seed)

    def draw(scale: float, shape: tuple[int, ...]) -> np.ndarray:
        return (scale * rng.normal(size=shape)).astype(np.float32).astype(np.float64)

    start = {n: draw(1.0, s) for n, s in SHAPES.items()}
    rounds = [
        [(int(rng.integers(1, 60)), {n: draw(5.0 if i == 0 else 0.1, s) for n, s in SHAPES.items()}) for i in range(k)] for k in clients_per_round
    ]
    return start, rounds


def _run_flower(strategy: Strategy, start: Arrays, rounds: Sequence[Round]) -> list[Arrays]:
    current = [start[n] for n in NAMES]
    out = []
    for server_round, clients in enumerate(rounds, start=1):
        results = [
            (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([current[i] + d[n] for i, n in enumerate(NAMES)]), k, {})) for k, d in clients
        ]
        parameters, _ = strategy.aggregate_fit(server_round, results, failures=[])  # type: ignore[arg-type]
        assert parameters is not None
        current = parameters_to_ndarrays(parameters)
        out.append(dict(zip(NAMES, current, strict=True)))
    return out


def _run_fedlm(agg: Aggregator, start: Arrays, rounds: Sequence[Round]) -> list[Arrays]:
    params = {n: torch.tensor(a, dtype=torch.float32) for n, a in start.items()}
    out = []
    for r, clients in enumerate(rounds, start=1):
        updates = [ClientUpdate(f"c{i}", r, k, {n: torch.tensor(d[n], dtype=torch.float32) for n in NAMES}) for i, (k, d) in enumerate(clients)]
        params = agg.aggregate(params, updates).params
        out.append({n: t.double().numpy() for n, t in params.items()})
    return out


@pytest.mark.parametrize(
    "flower, name, params, clients",
    [
        (lambda: FedMedian(), "median", {}, (4, 7, 5)),
        (lambda: FedTrimmedAvg(beta=0.2), "trimmed_mean", {"beta": 0.2}, (4, 7, 5)),
        (lambda: FedTrimmedAvg(beta=0.3), "trimmed_mean", {"beta": 0.3}, (6, 7, 10)),
        (lambda: Krum(num_malicious_clients=1), "krum", {"num_malicious": 1}, (5, 7, 6)),
        (
            lambda: Krum(num_malicious_clients=2, num_clients_to_keep=3),
            "multikrum",
            {"num_malicious": 2, "num_selected": 3},
            (7, 9, 8),
        ),
        (lambda: Krum(num_malicious_clients=1, num_clients_to_keep=5), "multikrum", {"num_malicious": 1}, (6, 6, 6)),
    ],
    ids=["FedMedian", "FedTrimmedAvg-0.2", "FedTrimmedAvg-0.3", "Krum", "MultiKrum-3", "MultiKrum-K-f"],
)
def test_robust_aggregators_match_flower(flower: Callable[[], Strategy], name: str, params: dict, clients: tuple[int, ...]) -> None:
    start, rounds = _scenario(len(name) + sum(clients), clients)
    ours = _run_fedlm(build_aggregator(name, params), start, rounds)
    for r, (a, b) in enumerate(zip(ours, _run_flower(flower(), start, rounds), strict=True), start=1):
        for n in NAMES:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-5, atol=1e-6, err_msg=f"round {r}, tensor {n}")


# --- LoRA geometry -----------------------------------------------------------------------------------------------


def _lora_global() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"m.lora_A.weight": (2, 3), "m.lora_B.weight": (4, 2), "bias": (3,)}  # r = 2, d_in = 3, d_out = 4
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def test_distance_view_gives_product_changes_for_lora_and_the_tensors_otherwise() -> None:
    state = _lora_global()
    g = torch.Generator().manual_seed(1)
    deltas = [{k: 0.3 * torch.randn(v.shape, generator=g) for k, v in state.items()} for _ in range(3)]
    views = [distance_view(state, d) for d in deltas]
    a, b = state["m.lora_A.weight"], state["m.lora_B.weight"]
    d = deltas[0]
    expected = (b + d["m.lora_B.weight"]) @ (a + d["m.lora_A.weight"]) - b @ a
    assert sorted(views[0]) == ["bias", "m.lora_product"]
    assert torch.allclose(views[0]["m.lora_product"], expected) and torch.equal(views[0]["bias"], d["bias"])
    flat = [torch.cat([t.reshape(-1) for _, t in sorted(product_delta(state, d).items())]).double() for d in deltas]
    brute = torch.stack([torch.stack([(x - y).square().sum() for y in flat]) for x in flat])
    assert torch.allclose(pairwise_sq_distances(views), brute)
    assert torch.allclose(norms(views), torch.stack([x.norm() for x in flat]))
    plain = {"bias": torch.ones(3)}
    assert distance_view({"bias": torch.zeros(3)}, plain) is plain


def test_krum_ranks_lora_clients_by_product_not_factor_distance() -> None:
    """B = 0 and A = I at the start, so a client's product change is dB (I + dA).

    p, q have the product I and s 1.05 I, with factors spread far apart; t, u, v have dA = 0 and products 1.5 I,
    1.6 I, 1.7 I, tight in factor space. With f = 1 each score sums the 3 nearest squared distances (||c I||² = 2c²).
    Factor space: v scores 0.02 + 0.08 + 0.68 (to q) = 0.78, lowest. Product space: s scores 0.005 + 0.005 + 0.405
    = 0.415, p and q 0 + 0.005 + 0.5, t 0.02 + 0.08 + 0.405.
    """
    eye = torch.eye(2)
    state = {"m.lora_A.weight": eye.clone(), "m.lora_B.weight": torch.zeros(2, 2)}
    factors = {"p": (0.5, 1.0), "q": (2.0, -0.5), "s": (4.2, -0.75), "t": (1.5, 0.0), "u": (1.6, 0.0), "v": (1.7, 0.0)}
    updates = [ClientUpdate(c, 1, 10, {"m.lora_B.weight": db * eye, "m.lora_A.weight": da * eye}) for c, (db, da) in factors.items()]
    raw = krum_select(pairwise_sq_distances([u.tensors for u in updates]), 1, 1)
    product = krum_select(pairwise_sq_distances([distance_view(state, u.tensors) for u in updates]), 1, 1)
    assert [updates[i].client_id for i in raw] == ["v"] and [updates[i].client_id for i in product] == ["s"]
    out = build_aggregator("krum", {"num_malicious": 1}).aggregate(state, updates)
    assert out.client_weights == {"s": 1.0} and out.excluded == ["p", "q", "t", "u", "v"]
    assert torch.allclose(out.params["m.lora_B.weight"] @ out.params["m.lora_A.weight"], 1.05 * eye)  # 4.2 I (0.25 I)


# --- bad parameters ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, field",
    [
        ("trimmed_mean", {"beta": 0.5}, "beta"),
        ("trimmed_mean", {"beta": -0.1}, "beta"),
        ("krum", {"num_malicious": -1}, "num_malicious"),
        ("multikrum", {"num_malicious": -2}, "num_malicious"),
        ("multikrum", {"num_selected": 0}, "num_selected"),
        ("norm_bound", {"max_norm": 0.0}, "max_norm"),
        ("norm_bound", {"max_norm": -1.0}, "max_norm"),
        ("flame", {"noise_lambda": -0.1}, "noise_lambda"),
        ("median", {"server_lr": 0.0}, "server_lr"),
        ("median", {"server_lr": float("nan")}, "server_lr"),
        ("median", {"beta": 0.1}, "beta"),
    ],
)
def test_bad_parameters_name_the_field(name: str, params: dict, field: str) -> None:
    with pytest.raises(FedlmError, match=rf"`aggregation\.{field}`"):
        build_aggregator(name, params)


def _fltrust(server: list[float], clients: list[list[float]]) -> tuple[torch.Tensor, object]:
    agg = build_aggregator("fltrust", {})
    agg.set_server_update(ClientUpdate("__server__", 1, 1, {"w": torch.tensor(server)}))
    updates = [ClientUpdate(f"c{i}", 1, 10 * (i + 1), {"w": torch.tensor(v)}) for i, v in enumerate(clients)]
    result = agg.aggregate({"w": torch.zeros(len(server))}, updates)
    return result.params["w"], result


def test_fltrust_hand_computed() -> None:
    # g0 = (1, 0). c0 = (1, 1): cos 1/sqrt2, rescaled by ||g0||/||c0|| = 1/sqrt2 to (1/sqrt2, 1/sqrt2).
    # c1 = (2, 0): cos 1, rescaled to (1, 0). c2 = (-1, 0): cos -1 -> trust 0, excluded.
    # g = (0.7071 * (0.7071, 0.7071) + 1 * (1, 0)) / 1.7071 = (1.5, 0.5) / 1.7071 = (0.87868, 0.29289)
    out, result = _fltrust([1.0, 0.0], [[1.0, 1.0], [2.0, 0.0], [-1.0, 0.0]])
    assert torch.allclose(out, torch.tensor([0.87868, 0.29289]), atol=1e-5)
    assert result.excluded == ["c2"]
    assert result.client_weights["c2"] == 0.0
    assert result.client_weights["c1"] == pytest.approx(1 / 1.70711, rel=1e-4)


def test_fltrust_keeps_the_model_when_nobody_is_trusted() -> None:
    out, result = _fltrust([1.0, 0.0], [[-1.0, 0.0], [0.0, 2.0]])
    assert torch.equal(out, torch.zeros(2)) and result.excluded == ["c0", "c1"]


def test_fltrust_without_a_server_update_says_so() -> None:
    with pytest.raises(FedlmError, match="root-set update"):
        build_aggregator("fltrust", {}).aggregate({"w": torch.zeros(1)}, [ClientUpdate("c", 1, 1, {"w": torch.ones(1)})])
