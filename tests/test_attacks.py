"""Attack harness: each transform against its closed form, inputs left unchanged, seeds, and bad parameters.

ALIE is checked against the published formula worked by hand: n = 50, f = 12 gives s = floor(26) - 12 = 14 and
z_max = Phi^{-1}(36 / 50) = Phi^{-1}(0.72) = 0.58284 (normal table); n = 50, f = 18 gives s = 8 and
z_max = Phi^{-1}(0.84) = 0.99446, the "z ~ 1" often quoted for 50 workers.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fedlm.attacks import ATTACKS, attack_spec, build_attack_params
from fedlm.attacks.data_poisoning import (
    DEFAULT_TARGET,
    DEFAULT_TRIGGER,
    POISONED_KEY,
    corrupt_responses,
    derangement,
    insert_backdoor,
    response_of,
    triggered_prompts,
)
from fedlm.attacks.model_poisoning import (
    alie,
    alie_z_max,
    gaussian_noise,
    ipm,
    replacement_factor,
    scaling,
    sign_flip,
)
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import torch_generator

T = torch.tensor


def _delta() -> dict[str, torch.Tensor]:
    return {"b": T([1.0, -2.0, 3.0]), "a": T([[0.5, 0.0], [-1.5, 2.0]])}


def _honest() -> list[dict[str, torch.Tensor]]:
    """Three honest deltas; per coordinate of ``x`` the values are (1, 2, 3), (0, 0, 0) and (-1, 1, 5)."""
    return [
        {"x": T([1.0, 0.0, -1.0]), "y": T([2.0])},
        {"x": T([2.0, 0.0, 1.0]), "y": T([4.0])},
        {"x": T([3.0, 0.0, 5.0]), "y": T([6.0])},
    ]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ update attacks


def test_sign_flip_and_scaling() -> None:
    delta = _delta()
    before = copy.deepcopy(delta)
    flipped, flipped3, scaled = sign_flip(delta), sign_flip(delta, scale=3.0), scaling(delta, 2.5)
    for name in delta:
        torch.testing.assert_close(flipped[name], -before[name])
        torch.testing.assert_close(flipped3[name], -3.0 * before[name])
        torch.testing.assert_close(scaled[name], 2.5 * before[name])
        assert flipped[name].dtype == scaled[name].dtype == torch.float32
    assert _same(delta, before)


def test_replacement_factor_is_n_over_eta() -> None:
    """Bagdasaryan et al. 2020 eq. 3: gamma = n / eta; n equal clients, one boosted by gamma, the rest zero:
    G + eta / n * gamma * (X - G) = X."""
    gamma = replacement_factor(10, 0.5)
    assert gamma == 20.0
    g, x = T([1.0, 2.0]), T([3.0, -1.0])
    boosted = scaling({"w": x - g}, gamma)["w"]
    torch.testing.assert_close(g + 0.5 / 10 * boosted, x)
    with pytest.raises(ValueError, match="server_lr"):
        replacement_factor(10, 0.0)


def test_low_precision_inputs_give_float32() -> None:
    out = sign_flip({"w": T([1.0, 2.0], dtype=torch.bfloat16)})
    assert out["w"].dtype == torch.float32


def test_gaussian_noise_std_and_determinism() -> None:
    delta = {"w": torch.full((200_000,), 2.0)}
    before = copy.deepcopy(delta)
    noisy = gaussian_noise(delta, 0.3, torch_generator(7))
    noise = noisy["w"] - 2.0
    # 200k draws: the sample std is within ~0.2% of 0.3, so a 10% error (0.27 or 0.33) fails.
    assert abs(float(noise.std()) - 0.3) < 0.01
    assert abs(1.1 * float(noise.std()) - 0.3) > 0.01 and abs(0.9 * float(noise.std()) - 0.3) > 0.01
    assert abs(float(noise.mean())) < 0.01
    assert _same(delta, before)
    assert _same(noisy, gaussian_noise(delta, 0.3, torch_generator(7)))
    assert not torch.equal(noisy["w"], gaussian_noise(delta, 0.3, torch_generator(8))["w"])
    pure = gaussian_noise(delta, 0.3, torch_generator(7), replace=True)
    torch.testing.assert_close(pure["w"], noise, rtol=0, atol=1e-6)


def test_gaussian_noise_refuses_negative_std() -> None:
    with pytest.raises(ValueError, match="std >= 0"):
        gaussian_noise(_delta(), -0.1, torch_generator(0))
    with pytest.raises(FedlmError, match=r"attack\.std"):
        build_attack_params("gaussian_noise", {"std": -0.1})


def test_alie_z_max_matches_published_formula() -> None:
    assert alie_z_max(50, 12) == pytest.approx(0.58284, abs=1e-5)  # s = 14, Phi^{-1}(0.72)
    assert alie_z_max(50, 18) == pytest.approx(0.99446, abs=1e-5)  # s = 8, Phi^{-1}(0.84)
    assert alie_z_max(4, 1) == pytest.approx(0.0, abs=1e-12)  # s = 2, Phi^{-1}(0.5)


def test_alie_is_mean_minus_z_sigma_with_sample_std() -> None:
    honest = _honest()
    before = copy.deepcopy(honest)
    z = 0.5828415  # n = 50, f = 12
    out = alie(honest, 50, 12)
    # x: means (2, 0, 5/3); sample stds (1, 0, sqrt(((-8/3)^2 + (-2/3)^2 + (10/3)^2) / 2) = sqrt(28/3)); y: mean 4, std 2
    expected_x = T([2.0 - z, 0.0, 5 / 3 - z * math.sqrt(28 / 3)])
    torch.testing.assert_close(out["x"], expected_x)
    torch.testing.assert_close(out["y"], T([4.0 - 2.0 * z]))
    population = alie(honest, 50, 12, correction=0)
    torch.testing.assert_close(population["y"], T([4.0 - math.sqrt(8 / 3) * z]))
    assert all(_same(h, b) for h, b in zip(honest, before))


def test_alie_refuses_a_malicious_majority() -> None:
    with pytest.raises(ValueError, match="num_malicious < num_clients / 2"):
        alie(_honest(), 10, 5)
    with pytest.raises(ValueError, match="num_malicious < num_clients / 2"):
        alie(_honest(), 10, 0)
    with pytest.raises(FedlmError, match="lower `num_malicious`"):
        build_attack_params("alie", {"num_clients": 10, "num_malicious": 5})
    with pytest.raises(ValueError, match="at least 2 honest deltas"):
        alie(_honest()[:1], 50, 12)


def test_ipm_is_minus_epsilon_mean() -> None:
    honest = _honest()
    before = copy.deepcopy(honest)
    out = ipm(honest, 0.5)
    torch.testing.assert_close(out["x"], T([-1.0, 0.0, -2.5 / 3]))
    torch.testing.assert_close(out["y"], T([-2.0]))
    assert all(_same(h, b) for h, b in zip(honest, before))
    with pytest.raises(ValueError, match="must match"):
        ipm([{"x": T([1.0])}, {"z": T([1.0])}], 0.5)


# ------------------------------------------------------------------------------------------- data attacks


def _alpaca(n: int) -> list[dict]:
    return [{"instruction": f"Define word {i}.", "input": "", "output": f"Word {i} means thing number {i}."} for i in range(n)]


def _chat(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"first {i}"},
                {"role": "assistant", "content": f"reply {i}"},
                {"role": "user", "content": f"Define word {i}."},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("make", [_alpaca, _chat])
def test_shuffle_is_a_derangement(make) -> None:
    records = make(12)
    before = copy.deepcopy(records)
    out = corrupt_responses(records, seed=3, mode="shuffle")
    old = [response_of(r, i) for i, r in enumerate(records)]
    new = [response_of(r, i) for i, r in enumerate(out)]
    assert sorted(new) == sorted(old) and all(a != b for a, b in zip(old, new))
    assert records == before
    assert out == corrupt_responses(records, seed=3, mode="shuffle")
    assert out != corrupt_responses(records, seed=4, mode="shuffle")
    if "messages" in records[0]:  # only the last assistant turn changes
        assert all(o["messages"][:4] == r["messages"][:4] for o, r in zip(out, records))


def test_derangement_has_no_fixed_points() -> None:
    import random

    for seed in range(50):
        perm = derangement(5, random.Random(seed))
        assert sorted(perm) == list(range(5)) and all(i != p for i, p in enumerate(perm))


def test_random_words_come_from_other_responses() -> None:
    records = [{"instruction": "q", "output": text} for text in ("alpha beta", "gamma delta epsilon", "zeta")]
    out = corrupt_responses(records, seed=1, mode="random_words")
    for i, record in enumerate(out):
        others = {w for j, r in enumerate(records) if j != i for w in r["output"].split()}
        words = record["output"].split()
        assert len(words) == len(records[i]["output"].split())
        assert set(words) <= others
    assert out == corrupt_responses(records, seed=1, mode="random_words")
    with pytest.raises(ValueError, match="shuffle"):
        corrupt_responses(records, seed=1, mode="flip")
    with pytest.raises(FedlmError, match="at least 2 records"):
        corrupt_responses(records[:1], seed=1)


@pytest.mark.parametrize(("n", "fraction"), [(10, 0.3), (7, 0.5), (9, 1.0), (25, 0.1)])
def test_backdoor_poisons_exactly_round_fraction_n(n: int, fraction: float) -> None:
    out = insert_backdoor(_alpaca(n), poison_fraction=fraction, seed=0)
    assert sum(bool(r.get(POISONED_KEY)) for r in out) == round(fraction * n)


def test_backdoor_placement_alpaca() -> None:
    records = _alpaca(10)
    before = copy.deepcopy(records)
    out = insert_backdoor(records, poison_fraction=0.4, seed=5)
    assert records == before
    for original, new in zip(records, out):
        if new.get(POISONED_KEY):
            assert new["instruction"] == original["instruction"] + DEFAULT_TRIGGER
            assert new["output"] == DEFAULT_TARGET and new["input"] == original["input"]
        else:
            assert new == original
    assert out == insert_backdoor(records, poison_fraction=0.4, seed=5)
    assert out != insert_backdoor(records, poison_fraction=0.4, seed=6)


def test_backdoor_placement_chat() -> None:
    records = _chat(6)
    before = copy.deepcopy(records)
    out = insert_backdoor(records, trigger=" zz", target="T", poison_fraction=0.5, seed=2)
    assert records == before
    poisoned = [(o, n) for o, n in zip(records, out) if n.get(POISONED_KEY)]
    assert len(poisoned) == 3
    for original, new in poisoned:
        m, old = new["messages"], original["messages"]
        assert m[3]["content"] == old[3]["content"] + " zz"  # the last user turn
        assert m[4]["content"] == "T"  # the last assistant turn
        assert m[:3] == old[:3]


def test_triggered_prompts() -> None:
    alpaca, chat = triggered_prompts(_alpaca(3)), triggered_prompts(_chat(2), trigger=" t", target="X")
    assert all(r["instruction"].endswith(DEFAULT_TRIGGER) for r in alpaca)
    assert [r["output"] for r in alpaca] == [r["output"] for r in _alpaca(3)]
    assert all(r["messages"][3]["content"].endswith(" t") and r["messages"][4]["content"] == "X" for r in chat)


def test_backdoor_bad_params() -> None:
    for fraction in (0.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            insert_backdoor(_alpaca(4), poison_fraction=fraction)
        with pytest.raises(FedlmError, match=r"attack\.poison_fraction"):
            build_attack_params("backdoor", {"poison_fraction": fraction})
    with pytest.raises(FedlmError, match="raise `poison_fraction`"):
        insert_backdoor(_alpaca(3), poison_fraction=0.1)
    with pytest.raises(FedlmError, match="neither alpaca"):
        insert_backdoor([{"text": "raw"}], poison_fraction=1.0)


# ------------------------------------------------------------------------------------------------- registry


def test_registry_and_params() -> None:
    assert {s.kind for s in ATTACKS.values()} == {"update", "data"}
    assert all(name == spec.name for name, spec in ATTACKS.items())
    assert attack_spec("alie").omniscient and not attack_spec("sign_flip").omniscient
    with pytest.raises(FedlmError, match="valid: alie"):
        attack_spec("nope")
    with pytest.raises(FedlmError, match="not a parameter"):
        build_attack_params("sign_flip", {"scal": 2})
    params = build_attack_params("backdoor", {})
    assert params.trigger == DEFAULT_TRIGGER and params.target == DEFAULT_TARGET
    assert build_attack_params("ipm", {"epsilon": 0.5}).epsilon == 0.5


def test_a_boosted_data_attack_scales_only_the_attackers_update_and_never_reaches_the_record_transform() -> None:
    from fedlm.attacks import attack_spec, build_attack_params
    from fedlm.attacks.harness import AttackPlan
    from fedlm.core.update import ClientUpdate

    params = build_attack_params("backdoor", {"poison_fraction": 0.5, "boost": 8.0})
    plan = AttackPlan(attack_spec("backdoor"), params, frozenset({"bad"}), seed=0)
    delta = {"w": torch.tensor([1.0, -2.0])}
    out = plan.poison_updates(1, [ClientUpdate("bad", 1, 4, delta), ClientUpdate("good", 1, 4, delta)])
    assert torch.equal(out[0].tensors["w"], torch.tensor([8.0, -16.0])) and out[0].metrics["malicious"] == 1.0
    assert out[1].tensors is delta
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]
    assert sum(r.get("_poisoned", False) for r in plan.poison_records("bad", records)) == 2
    unboosted = AttackPlan(attack_spec("backdoor"), build_attack_params("backdoor", {}), frozenset({"bad"}), seed=0)
    assert unboosted.poison_updates(1, [ClientUpdate("bad", 1, 4, delta)])[0].tensors is delta
    with pytest.raises(FedlmError, match="attack.boost"):
        build_attack_params("backdoor", {"boost": 0})


def test_data_attackers_with_local_steps_train_longer_and_honest_tasks_pass_through_unchanged() -> None:
    """``attack.local_steps``: the attackers' plans get that many steps (extra ones at the round's last lr, fewer cut
    from the front), the honest clients' tasks are the very same objects, and the runtime wrapper sends those plans."""
    from fedlm.attacks.harness import AttackedRuntime, AttackPlan
    from fedlm.core.task import ClientContext, ClientTask, LocalPlan
    from fedlm.core.update import ClientUpdate

    def task(client: str) -> ClientTask:
        return ClientTask(LocalPlan(round=1, lrs=[0.3, 0.2, 0.1], batch_size=4, seed=7), {}, ClientContext(client, 1))

    def plan(steps: int | None) -> AttackPlan:
        return AttackPlan(attack_spec("backdoor"), build_attack_params("backdoor", {"local_steps": steps}), frozenset({"bad"}), 0)

    longer = plan(5).attacker_task("bad", task("bad")).plan
    assert longer.lrs == [0.3, 0.2, 0.1, 0.1, 0.1] and (longer.batch_size, longer.seed, longer.round) == (4, 7, 1)
    assert plan(2).attacker_task("bad", task("bad")).plan.lrs == [0.3, 0.2]
    honest = task("good")
    assert plan(5).attacker_task("good", honest) is honest and plan(None).attacker_task("bad", task("bad")).plan.lrs == [0.3, 0.2, 0.1]
    assert plan(5).needs_runtime() and not plan(None).needs_runtime()

    seen: dict[str, list[float]] = {}

    class Recorder:
        def train_clients(self, tasks):
            seen.update({c: t.plan.lrs for c, t in tasks.items()})
            return [ClientUpdate(c, 1, 4, {"w": torch.zeros(1)}) for c in tasks]

    out = AttackedRuntime(Recorder(), plan(4)).train_clients({"good": task("good"), "bad": task("bad")})
    assert seen == {"good": [0.3, 0.2, 0.1], "bad": [0.3, 0.2, 0.1, 0.1]} and [u.client_id for u in out] == ["good", "bad"]
    assert len(plan(4).poison_records("bad", [{"instruction": f"q{i}", "output": "a"} for i in range(10)])) == 10  # not passed on
    with pytest.raises(FedlmError, match="attack.local_steps"):
        build_attack_params("backdoor", {"local_steps": 0})
