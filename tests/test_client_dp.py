"""Client-level DP wrapper: clipping, noise scale, central vs distributed noise, adaptive clipping, the wrapper."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fedlm.aggregation.base import AggregationResult, Aggregator, aggregator_class, build_aggregator, registered_aggregators
from fedlm.aggregation.fedadam import fedadam_step
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed, torch_generator
from fedlm.core.update import ClientUpdate
from fedlm.privacy.client_dp import ClientDPParams, DifferentiallyPrivate
from fedlm.privacy.dp_math import (
    adaptive_noise_multiplier,
    clip_update,
    gaussian_noise_like,
    geometric_clip_update,
    noised_mean,
    noised_unclipped_fraction,
    update_norm,
)

#: Relative band on a measured standard deviation. With >= 2e5 draws its standard error is about 0.16 %, so a
#: correct sampler sits well inside, and a sampler off by 10 % (either way) sits 8 % outside.
STD_TOL = 0.02

#: The aggregators that declare they need each client's own update (the capability, not a list of names).
NEEDS_INDIVIDUAL_UPDATES = [n for n in registered_aggregators() if aggregator_class(n).needs_individual_updates]


def _std_ok(measured: float, expected: float) -> bool:
    return abs(measured / expected - 1.0) < STD_TOL


def _dp(inner: str = "fedavg", **kw) -> DifferentiallyPrivate:
    params = ClientDPParams(**{"noise_multiplier": 0.0, "clip": 1.0, "expected_clients": 3, **kw})
    return DifferentiallyPrivate(build_aggregator(inner, {}), params)


def _params(n: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(n, 3, generator=g), "b": torch.randn(5, generator=g)}


def _updates(k: int, scale: float = 1.0, seed: int = 1, n: int = 12) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(f"c{i}", 1, 10 + 7 * i, {"a": scale * torch.randn(n, 3, generator=g), "b": scale * torch.randn(5, generator=g)})
        for i in range(k)
    ]


# --------------------------------------------------------------------------- clipping


def test_clipping_bounds_the_joint_norm_and_keeps_small_updates() -> None:
    for u in _updates(6, scale=0.05) + _updates(6, scale=3.0, seed=2):
        clipped, norm = clip_update(u.tensors, 1.0, client_id=u.client_id)
        assert norm == pytest.approx(update_norm(u.tensors), rel=1e-12)
        if norm <= 1.0:
            assert all(torch.equal(clipped[k], u.tensors[k]) for k in u.tensors)
        else:
            assert 1.0 - 1e-5 < update_norm(clipped) <= 1.0
            for k in u.tensors:  # same direction, one factor for every tensor
                assert torch.allclose(clipped[k], u.tensors[k] / norm, atol=1e-6)
    # the norm is over all tensors together: ||(3, 0 | 4)|| = 5 -> (0.6, 0 | 0.8)
    clipped, norm = clip_update({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}, 1.0)
    assert norm == 5.0
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0])) and torch.allclose(clipped["b"], torch.tensor([0.8]))
    zero, norm = clip_update({"a": torch.zeros(3)}, 0.1)
    assert norm == 0.0 and torch.equal(zero["a"], torch.zeros(3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_updates_are_rejected_naming_the_client(bad: float) -> None:
    tensors = {"a": torch.tensor([1.0, bad]), "b": torch.ones(2)}
    with pytest.raises(ValueError, match="client 'hospital-2'.*'a'"):
        clip_update(tensors, 1.0, client_id="hospital-2")
    updates = _updates(2) + [ClientUpdate("hospital-2", 1, 5, {"a": torch.full((12, 3), bad), "b": torch.zeros(5)})]
    with pytest.raises(ValueError, match="hospital-2"):
        _dp().aggregate(_params(), updates)


# --------------------------------------------------------------------------- noise scale


def test_noise_standard_deviation_matches_and_the_band_catches_a_10_percent_error() -> None:
    sigma, template = 0.7, {"w": torch.empty(200, 250), "b": torch.empty(1000)}

    def measured(scale: float) -> tuple[float, float]:
        gen = torch_generator(derive_seed(11, "noise-test"))
        draws = [gaussian_noise_like(template, scale * sigma, gen) for _ in range(5)]  # 5 x 51,000 coordinates
        flat = torch.cat([d[n].flatten() for d in draws for n in sorted(d)]).double()
        return float(flat.std()), float(flat.mean())

    std, mean = measured(1.0)
    assert _std_ok(std, sigma)
    assert abs(mean) < 5 * sigma / math.sqrt(255_000)
    assert not _std_ok(0.9 * sigma, sigma) and not _std_ok(1.1 * sigma, sigma)  # the band excludes +-10 %
    for wrong in (0.9, 1.1):  # and a sampler off by 10 % fails the same check
        assert not _std_ok(measured(wrong)[0], sigma)


def test_the_wrapper_adds_noise_z_c_over_m_to_the_mean() -> None:
    """Zero updates: w' - w = N(0, (z C)^2) / m per coordinate; each round draws new noise."""
    z, clip, m = 1.3, 0.5, 4
    dp = _dp(noise_multiplier=z, clip=clip, expected_clients=m, seed=3)
    params = {"w": torch.zeros(100_000)}
    zeros = [ClientUpdate(f"c{i}", 1, 1, {"w": torch.zeros(100_000)}) for i in range(m)]
    rounds = []
    for _ in range(3):
        result = dp.aggregate(params, zeros)
        assert result.metrics["dp_noise_std"] == pytest.approx(z * clip)
        rounds.append(result.params["w"])
    assert not torch.equal(rounds[0], rounds[1])
    assert _std_ok(float(torch.cat(rounds).double().std()), z * clip / m)


# --------------------------------------------------------------------------- central vs distributed


def test_central_and_distributed_noise_have_the_same_total_variance() -> None:
    """K shares N(0, (zC)^2 / K) sum to N(0, (zC)^2): central and distributed release the same noise variance."""
    z, clip, k, n = 1.1, 0.5, 5, 200_000
    g = torch.Generator().manual_seed(9)
    updates = [ClientUpdate(f"c{i}", 1, 3 + i, {"w": 1e-5 * torch.randn(n, generator=g)}) for i in range(k)]  # norms < C
    true_mean = sum(u.tensors["w"] for u in updates) / k
    params = {"w": torch.zeros(n)}

    central = _dp(noise_multiplier=z, clip=clip, expected_clients=k, seed=1).aggregate(params, updates).params["w"]
    dist = _dp(noise_multiplier=z, clip=clip, expected_clients=k, seed=2, mode="distributed")
    shares = [dist.privatize_client_update(u) for u in updates]
    share_noise = shares[0].tensors["w"] - updates[0].tensors["w"]
    assert _std_ok(float(share_noise.double().std()), z * clip / math.sqrt(k))  # each client adds only 1/K of the variance
    distributed = dist.aggregate(params, shares).params["w"]

    var_c = float((central - true_mean).double().var())
    var_d = float((distributed - true_mean).double().var())
    expected = (z * clip / k) ** 2
    # variance ratio: standard error sqrt(2/n + 2/n) ~ 0.45 %; a 10 % std error is a 21 % variance error
    assert abs(var_d / var_c - 1) < 0.03
    assert abs(var_c / expected - 1) < 0.03 and abs(var_d / expected - 1) < 0.03


# --------------------------------------------------------------------------- adaptive clipping


def test_adaptive_noise_multiplier_formula() -> None:
    # z = 1, sigma_b = 5: z_Delta = (1 - 1/100)^(-1/2) = 1.0050378152592121
    assert adaptive_noise_multiplier(1.0, 5.0) == pytest.approx(1.0050378152592121, rel=1e-12)
    assert adaptive_noise_multiplier(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="count_noise_std"):
        adaptive_noise_multiplier(1.0, 0.5)
    dp = _dp(noise_multiplier=1.0, clip=0.4, expected_clients=100, adaptive=True)  # sigma_b = 100 / 20 = 5
    metrics = dp.aggregate(_params(), _updates(3)).metrics
    assert metrics["dp_noise_multiplier"] == pytest.approx(1.0050378152592121)
    assert metrics["dp_noise_std"] == pytest.approx(0.4 * 1.0050378152592121)


def test_adaptive_clipping_follows_the_geometric_update_exactly_without_count_noise() -> None:
    """Norms (0.5, 0.8, 0.9, 3.0), m = 4, gamma = 0.5, eta = 0.2, C_0 = 1 (hand-computed):

    r1: 3 of 4 <= 1      -> b~ = 0.75, C_1 = exp(-0.2 * 0.25) = exp(-0.05) = 0.951229424500714
    r2: 3 of 4 <= 0.9512 -> C_2 = exp(-0.10) = 0.9048374180359595
    r3: 3 of 4 <= 0.9048 -> C_3 = exp(-0.15) = 0.8607079764250578
    r4: 2 of 4 <= 0.8607 -> b~ = 0.5 = gamma, C_4 = C_3
    """
    norms = [0.5, 0.8, 0.9, 3.0]
    expected = [1.0, 0.951229424500714, 0.9048374180359595, 0.8607079764250578, 0.8607079764250578]
    clip = 1.0
    for want in expected[1:]:
        frac = noised_unclipped_fraction(norms, clip, count_noise_std=0.0, expected_clients=4, generator=torch.Generator())
        clip = geometric_clip_update(clip, frac, target_quantile=0.5, clip_lr=0.2)
        assert clip == pytest.approx(want, rel=1e-12)

    dp = _dp(clip=1.0, expected_clients=4, adaptive=True, count_noise_std=0.0)
    updates = [ClientUpdate(f"c{i}", 1, 1, {"w": torch.tensor([v, 0.0])}) for i, v in enumerate(norms)]
    for r, (used, nxt, clipped) in enumerate(zip(expected, expected[1:], [0.25, 0.25, 0.25, 0.5])):
        metrics = dp.aggregate({"w": torch.zeros(2)}, updates).metrics
        assert metrics["dp_clip"] == pytest.approx(used, rel=1e-12), r
        assert metrics["dp_next_clip"] == pytest.approx(nxt, rel=1e-12), r
        assert metrics["dp_fraction_clipped"] == clipped, r
    assert dp.clip == pytest.approx(expected[-1], rel=1e-12)


@pytest.mark.parametrize("gamma, start", [(0.5, 0.1), (0.9, 4.0)])
def test_adaptive_clipping_moves_to_the_target_quantile(gamma: float, start: float) -> None:
    """Update norms ~ LogNormal(0, 0.5): the gamma-quantile is exp(0.5 * Phi^-1(gamma)) (1.0 and 1.8980).

    From above with gamma = 0.9 the clip falls by at most exp(-eta (1 - gamma)) = exp(-0.02) a round, hence the
    closer start; from below with gamma = 0.5 it rises by up to exp(0.1) a round.
    """
    m = 100
    dp = _dp(noise_multiplier=1.0, clip=start, expected_clients=m, adaptive=True, target_quantile=gamma, seed=4)
    target = math.exp(0.5 * torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(gamma)).item())
    g = torch.Generator().manual_seed(5)
    clips, fracs = [], []
    for _ in range(90):
        norms = torch.exp(0.5 * torch.randn(m, generator=g, dtype=torch.float64))
        updates = [ClientUpdate(f"c{i:03d}", 1, 1, {"w": norms[i : i + 1].float()}) for i in range(m)]
        metrics = dp.aggregate({"w": torch.zeros(1)}, updates).metrics
        clips.append(metrics["dp_clip"])
        fracs.append(1.0 - metrics["dp_fraction_clipped"])
    assert abs(math.log(clips[10]) - math.log(target)) < abs(math.log(start) - math.log(target))  # moving toward it
    late = clips[-30:]
    assert abs(sum(math.log(c) for c in late) / len(late) - math.log(target)) < 0.15
    assert abs(sum(fracs[-30:]) / 30 - gamma) < 0.05


# --------------------------------------------------------------------------- the wrapper


def test_noise_free_dp_around_fedavg_is_the_unweighted_mean_over_expected_clients() -> None:
    """z = 0, C huge: w' = w + (1/m) sum_k Delta_k, whatever the n_k (m = K here, then m = K + 1)."""
    params, updates = _params(), _updates(3)
    out = _dp(clip=1e6, expected_clients=3).aggregate(params, updates).params
    weighted = build_aggregator("fedavg", {}).aggregate(params, updates).params
    for k in params:
        assert torch.allclose(out[k], params[k] + sum(u.tensors[k] for u in updates) / 3, atol=1e-6)
        assert not torch.allclose(out[k], weighted[k], atol=1e-4)  # example weights are dropped
    fixed = _dp(clip=1e6, expected_clients=4).aggregate(params, updates).params
    assert all(torch.allclose(fixed[k], params[k] + sum(u.tensors[k] for u in updates) / 4, atol=1e-6) for k in params)


def test_dp_around_fedadam_feeds_the_noised_mean_to_adam() -> None:
    params, updates = _params(), _updates(3, scale=0.5)
    z, clip, m, seed = 0.8, 0.5, 3, 7
    dp = _dp("fedadam", noise_multiplier=z, clip=clip, expected_clients=m, seed=seed)
    clipped = [clip_update(u.tensors, clip)[0] for u in sorted(updates, key=lambda u: u.client_id)]
    mean = noised_mean(clipped, noise_std=z * clip, expected_clients=m, generator=torch_generator(derive_seed(seed, "dp-noise", 1)))
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    want = fedadam_step(params, mean, zeros, zeros, eta=1e-2, beta1=0.9, beta2=0.99, tau=1e-3).params
    got = dp.aggregate(params, updates[::-1]).params  # client order does not matter
    for k in params:
        assert torch.allclose(got[k], want[k], atol=1e-7)
    assert int(dp.state_dict()["inner"]["step"]) == 1


def test_state_round_trips_and_the_continuation_is_identical() -> None:
    def make() -> DifferentiallyPrivate:
        return _dp("fedadam", noise_multiplier=0.9, clip=0.3, expected_clients=3, adaptive=True, count_noise_std=1.0, seed=5)

    params, first = _params(), make()
    for r in (1, 2):
        params = first.aggregate(params, _updates(3, seed=r)).params
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # as a checkpoint does
    buf.seek(0)
    second, fresh = make(), make()
    second.load_state_dict(torch.load(buf))
    assert second.clip == first.clip != 0.3 and second.round == 2
    for r in (3, 4):
        a: AggregationResult = first.aggregate(params, _updates(3, seed=r))
        b = second.aggregate(params, _updates(3, seed=r))
        assert all(torch.equal(a.params[k], b.params[k]) for k in params)
        assert a.metrics == b.metrics
    c = fresh.aggregate(params, _updates(3, seed=3)).params  # without the state: other noise, other clip, no moments
    assert not all(torch.equal(a.params[k], c[k]) for k in params)


@pytest.mark.parametrize("name", sorted(NEEDS_INDIVIDUAL_UPDATES))
def test_aggregators_that_need_individual_updates_are_refused(name: str) -> None:
    assert name in registered_aggregators()
    with pytest.raises(FedlmError, match=f"cannot wrap `aggregation.name: {name}`.*individual"):
        _dp(name)


def test_other_refusals_and_config_errors() -> None:
    class NeedsServer(build_aggregator("fedavg", {}).__class__):
        needs_server_update = True

    with pytest.raises(FedlmError, match="server's own update"):
        DifferentiallyPrivate(NeedsServer(build_aggregator("fedavg", {}).params), ClientDPParams(noise_multiplier=1, clip=1, expected_clients=3))
    with pytest.raises(FedlmError, match="differentially private already"):
        DifferentiallyPrivate(_dp(), ClientDPParams(noise_multiplier=1, clip=1, expected_clients=3))
    inner = build_aggregator("fedavg", {})
    with pytest.raises(FedlmError, match="secure aggregation"):
        DifferentiallyPrivate.from_config(inner, {"noise_multiplier": 1, "clip": 1, "expected_clients": 10, "adaptive": True, "mode": "distributed"})
    with pytest.raises(FedlmError, match="count_noise_std"):  # sigma_b = 10 / 20 = 0.5, 2 sigma_b = 1 <= z
        DifferentiallyPrivate.from_config(inner, {"noise_multiplier": 1, "clip": 1, "expected_clients": 10, "adaptive": True})
    with pytest.raises(FedlmError, match="`privacy.clip`"):
        DifferentiallyPrivate.from_config(inner, {"noise_multiplier": 1, "expected_clients": 10})


def test_the_wrapper_delegates_hooks_and_accepts_every_other_aggregator() -> None:
    for name in registered_aggregators():
        if name not in NEEDS_INDIVIDUAL_UPDATES:
            dp = _dp(name, noise_multiplier=0.5)
            assert isinstance(dp.inner, Aggregator) and not dp.needs_server_update
            assert all(torch.isfinite(v).all() for v in dp.aggregate(_params(), _updates(3)).params.values())
    prox = _dp("fedprox")
    assert [type(h) for h in prox.trainer_hooks()] == [type(h) for h in prox.inner.trainer_hooks()] != []
