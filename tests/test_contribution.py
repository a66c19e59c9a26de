"""Contribution scores in closed form: exact Shapley on games with known values and against the permutation
definition, GTG-Shapley against exact enumeration, leave-one-out, the round's coalition game on real aggregators
with a quadratic validation loss (free-rider, shuffled answers, duplicated data), the sampling, and the config rules."""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fedlm.aggregation.base import build_aggregator, registered_aggregators
from fedlm.aggregation.lora import build_lora_mode
from fedlm.config.io import validate_config
from fedlm.config.schema import ExperimentConfig
from fedlm.contribution.gtg import GtgSettings, gtg_shapley
from fedlm.contribution.loo import leave_one_out
from fedlm.contribution.observer import ContributionObserver
from fedlm.contribution.sampling import ContributionSampler, sampling_probabilities
from fedlm.contribution.scores import score_round
from fedlm.contribution.shapley import CachedUtility, Coalition, exact_shapley
from fedlm.contribution.utility import RoundGame
from fedlm.core.errors import FedlmError
from fedlm.core.update import ClientUpdate
from fedlm.federation.aggregation_step import AggregationStep
from fedlm.reporting.contribution import average_ranks, spearman
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole

# ------------------------------------------------------------------------------------------ games with known values


def glove(coalition: Coalition) -> float:
    """The glove game: one left glove (L), two right gloves (R1, R2); a pair is worth 1."""
    return 1.0 if "L" in coalition and ({"R1", "R2"} & coalition) else 0.0


def random_game(players: list[str], seed: int) -> dict[Coalition, float]:
    rng = random.Random(seed)
    return {frozenset(c): rng.uniform(-1, 1) for k in range(len(players) + 1) for c in itertools.combinations(players, k)}


def by_permutations(players: list[str], v: Any) -> dict[str, float]:
    """The Shapley value from its other definition: the mean marginal gain over all n! orders."""
    totals = dict.fromkeys(players, 0.0)
    orders = list(itertools.permutations(players))
    for order in orders:
        coalition: frozenset[str] = frozenset()
        for p in order:
            totals[p] += v(coalition | {p}) - v(coalition)
            coalition = coalition | {p}
    return {p: t / len(orders) for p, t in totals.items()}


def test_exact_shapley_of_the_glove_game() -> None:
    values = exact_shapley(["L", "R1", "R2"], glove)
    assert values == pytest.approx({"L": 2 / 3, "R1": 1 / 6, "R2": 1 / 6})


def test_exact_shapley_of_an_additive_game_is_each_weight() -> None:
    weights = {"a": 0.5, "b": -0.25, "c": 2.0, "d": 0.0}
    values = exact_shapley(list(weights), lambda s: sum(weights[p] for p in s) + 3.0)
    assert values == pytest.approx(weights)


def test_exact_shapley_matches_the_permutation_definition_and_is_efficient() -> None:
    players = ["a", "b", "c", "d", "e"]
    table = random_game(players, 7)
    values = exact_shapley(players, table.__getitem__)
    assert values == pytest.approx(by_permutations(players, table.__getitem__), abs=1e-12)
    assert sum(values.values()) == pytest.approx(table[frozenset(players)] - table[frozenset()])


def test_exact_shapley_refuses_more_than_six_players() -> None:
    with pytest.raises(ValueError, match="7 players"):
        exact_shapley(list("abcdefg"), lambda s: 0.0)


def test_leave_one_out_misses_substitutes() -> None:
    """LOO credits L with the whole pair and each right glove with nothing: either one can be left out."""
    assert leave_one_out(["L", "R1", "R2"], glove) == {"L": 1.0, "R1": 0.0, "R2": 0.0}


# ------------------------------------------------------------------------------------------ GTG-Shapley vs exact

NO_TRUNCATION = GtgSettings(max_permutations=3000, truncation=0.0, round_truncation=0.0, tolerance=1e-9)


def test_gtg_is_exact_on_an_additive_game_after_one_permutation() -> None:
    weights = {"a": 0.3, "b": -0.1, "c": 0.7}
    result = gtg_shapley(list(weights), lambda s: sum(weights[p] for p in s), GtgSettings(max_permutations=1, truncation=0.0), seed=0)
    assert result.values == pytest.approx(weights) and result.permutations == 1


def test_gtg_without_truncation_converges_to_exact_shapley_and_is_efficient() -> None:
    players = ["a", "b", "c", "d", "e"]
    table = random_game(players, 3)
    exact = exact_shapley(players, table.__getitem__)
    result = gtg_shapley(players, table.__getitem__, NO_TRUNCATION, seed=1)
    assert sum(result.values.values()) == pytest.approx(table[frozenset(players)] - table[frozenset()])
    scale = max(abs(v) for v in exact.values())
    assert max(abs(result.values[p] - exact[p]) for p in players) < 0.06 * scale  # Monte-Carlo error after 3000 orders


def test_gtg_with_its_default_truncation_ranks_like_exact_on_a_round_game() -> None:
    """Defaults on a FedAvg round with a quadratic loss: the same ranking as exact, fewer coalitions priced."""
    game = quadratic_round(honest=4, free_rider=True, shuffled=True)
    exact_priced, gtg_priced = CachedUtility(game), CachedUtility(game)
    exact = exact_shapley(game.players, exact_priced)
    result = gtg_shapley(game.players, gtg_priced, GtgSettings(), seed=0)
    assert spearman([exact[p] for p in game.players], [result.values[p] for p in game.players]) > 0.9
    assert gtg_priced.evaluations < exact_priced.evaluations == 2**6


def test_gtg_between_round_truncation_scores_zero_for_two_prices() -> None:
    priced = CachedUtility(lambda s: 1.0 + 1e-9 * len(s))
    result = gtg_shapley(["a", "b", "c"], priced, GtgSettings(round_truncation=1e-6), seed=0)
    assert result.round_truncated and result.values == {"a": 0.0, "b": 0.0, "c": 0.0} and priced.evaluations == 2


def test_gtg_guided_sampling_puts_every_client_first_in_turn() -> None:
    firsts: list[str] = []

    def utility(s: Coalition) -> float:
        if len(s) == 1:
            firsts.append(next(iter(s)))
        return float(len(s))

    gtg_shapley(["a", "b", "c"], utility, GtgSettings(max_permutations=6, truncation=0.0, tolerance=1e-12), seed=0)
    assert firsts == ["a", "b", "c", "a", "b", "c"]


def test_score_round_prices_each_coalition_once_and_reports_each_methods_own_cost() -> None:
    priced = CachedUtility(glove)
    results = score_round(["L", "R1", "R2"], priced, ["exact", "loo", "gtg"], GtgSettings(truncation=0.0), seed=0)
    assert results["exact"].coalitions == 8 and results["loo"].coalitions == 5
    assert priced.evaluations == 8  # loo's and gtg's coalitions were already priced for exact
    assert results["exact"].scores == pytest.approx({"L": 2 / 3, "R1": 1 / 6, "R2": 1 / 6})


# ------------------------------------------------------------------------------------------ the round's game


TARGET = torch.tensor([1.0, -2.0, 0.5, 3.0])


def quadratic_round(
    honest: int, free_rider: bool = False, shuffled: bool = False, duplicate: str | None = None, aggregator: str = "fedavg"
) -> RoundGame:
    """A round from w = 0 towards TARGET: honest client i steps 0.2 + 0.15 i of the way (with seeded noise), the free-rider
    sends w back (delta 0), the shuffled-answers client steps towards a wrong target; validation loss ||w - TARGET||^2.
    ``duplicate``: that honest client's data twice (the same delta, twice the examples)."""
    gen = torch.Generator().manual_seed(0)
    updates = [
        ClientUpdate(f"h{i}", 1, 10 * (2 if duplicate == f"h{i}" else 1), {"w": (0.2 + 0.15 * i) * TARGET + 0.1 * torch.randn(4, generator=gen)})
        for i in range(honest)
    ]
    if free_rider:
        updates.append(ClientUpdate("free_rider", 1, 10, {"w": torch.zeros(4)}))
    if shuffled:
        updates.append(ClientUpdate("shuffled", 1, 10, {"w": -0.5 * TARGET.flip(0)}))
    start = {"w": torch.zeros(4)}
    tasks = {u.client_id: SimpleNamespace(state=start) for u in updates}
    agg = build_aggregator(aggregator, {})
    agg.start([u.client_id for u in updates])
    return RoundGame(start, tasks, updates, agg, build_lora_mode("naive", start, 4), {}, lambda s: float(((s["w"] - TARGET) ** 2).sum()))


def test_the_full_coalition_is_the_round_the_server_made() -> None:
    """v(N) prices exactly the state the round's aggregation step produced (same aggregator, same LoRA mode)."""
    game = quadratic_round(honest=3, free_rider=True, aggregator="fedadam")
    step = AggregationStep(build_aggregator("fedadam", {}), game.lora, {}, 1)
    outcome = step.aggregate(game.start_state, game.tasks, game.updates, 1)  # type: ignore[arg-type]
    assert torch.equal(game.model_of(frozenset(game.players))["w"], outcome.state["w"])
    assert game(frozenset()) == pytest.approx(-float((TARGET**2).sum()))


@pytest.mark.parametrize("method", ["exact", "gtg", "loo"])
def test_a_free_rider_and_a_shuffled_answers_client_rank_last(method: str) -> None:
    game = quadratic_round(honest=4, free_rider=True, shuffled=True)
    scores = score_round(game.players, CachedUtility(game), [method], GtgSettings(), seed=0)[method].scores
    ranked = sorted(scores, key=scores.get)  # type: ignore[arg-type]
    assert set(ranked[:2]) == {"free_rider", "shuffled"}, scores
    assert scores["shuffled"] < scores["free_rider"] < 0
    if method != "loo":  # leaving the weakest honest client out raises the mean step, so its LOO score is negative
        assert min(scores[f"h{i}"] for i in range(4)) > 0


def test_duplicating_a_clients_data_does_not_double_its_score() -> None:
    plain = exact_shapley(quadratic_round(honest=4).players, quadratic_round(honest=4))
    doubled_game = quadratic_round(honest=4, duplicate="h0")
    doubled = exact_shapley(doubled_game.players, doubled_game)
    assert doubled["h0"] < 2 * plain["h0"]


def test_a_clone_shares_the_credit_of_the_data_it_copies() -> None:
    """Two clients with the same update are symmetric players: each gets less than the original alone did."""
    game = quadratic_round(honest=3)
    clone = ClientUpdate("h0_copy", 1, game.updates[0].num_examples, game.updates[0].tensors)
    cloned = RoundGame(game.start_state, {**game.tasks, "h0_copy": game.tasks["h0"]}, [*game.updates, clone], *_rest(game))
    before, after = exact_shapley(game.players, game), exact_shapley(cloned.players, cloned)
    assert after["h0"] == pytest.approx(after["h0_copy"]) and after["h0"] < before["h0"]


def _rest(game: RoundGame) -> tuple[Any, ...]:
    return game.aggregator, game.lora, game.client_ranks, game.loss


def test_pricing_a_coalition_leaves_the_runs_aggregator_state_alone() -> None:
    game = quadratic_round(honest=3, aggregator="fedavgm")
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in game.aggregator.state_dict().items()}
    exact_shapley(game.players, game)
    after = game.aggregator.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) if torch.is_tensor(before[k]) else True for k in before)


@pytest.mark.parametrize("name", registered_aggregators())
def test_every_aggregator_the_rules_accept_prices_a_coalition_of_one(name: str) -> None:
    config = _config(contribution={"methods": ["gtg"], "validation": "embedded:wordnet_defs/test"}, aggregation={"name": name})
    try:
        validate_config(config)
    except FedlmError as refused:
        assert "contribution.methods" in str(refused)
        return
    game = quadratic_round(honest=3, aggregator=name)
    assert math.isfinite(game(frozenset({"h1"})))


# ------------------------------------------------------------------------------------------ sampling


def test_sampling_probabilities_are_a_floored_softmax_of_standardised_scores() -> None:
    probs = sampling_probabilities({"a": 3.0, "b": 1.0, "c": -1.0}, ["a", "b", "c"], temperature=1.0, floor=0.3)
    z = [1.224744871391589, 0.0, -1.224744871391589]  # (x - mean) / std, std over the population
    soft = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    assert probs == pytest.approx([0.1 + 0.7 * s for s in soft])
    assert sum(probs) == pytest.approx(1.0) and min(probs) >= 0.1
    assert sampling_probabilities({}, ["a", "b"], 1.0, 0.3) == pytest.approx([0.5, 0.5])


def test_contribution_sampling_prefers_high_scorers_but_starves_nobody() -> None:
    scores = {"good": 1.0, "fair": 0.5, "free_rider": -1.0, "noisy": -0.8}
    sampler = ContributionSampler(lambda: scores, temperature=0.5, floor=0.2)
    names = list(scores)
    counts = dict.fromkeys(names, 0)
    for r in range(1, 401):
        chosen = sampler(names, 2, seed=0, round_num=r)
        assert len(set(chosen)) == 2 and chosen == sampler(names, 2, seed=0, round_num=r)
        for c in chosen:
            counts[c] += 1
    assert counts["good"] > counts["fair"] > counts["free_rider"] > 0


# ------------------------------------------------------------------------------------------ config


def _config(**sections: Any) -> dict[str, Any]:
    return {"partition": {"method": "iid", "num_clients": 4}, **sections}


def test_scores_without_a_validation_set_are_refused_with_how_to_give_one() -> None:
    with pytest.raises(FedlmError, match=r"`contribution.validation` is required.*contribution.validation: path/to/validation.jsonl"):
        validate_config(_config(contribution={"methods": ["gtg"]}))


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"federation": {"sampling": "contribution", "clients_per_round": 2}}, "needs contribution scores"),
        ({"federation": {"sampling": "contribution"}, "contribution": {"methods": ["gtg"], "validation": "v.jsonl"}}, "clients_per_round"),
        ({"contribution": {"methods": ["exact"], "validation": "v.jsonl"}, "partition": {"method": "iid", "num_clients": 8}}, "at most 6"),
        ({"contribution": {"methods": ["gtg"], "validation": "v.jsonl"}, "privacy": {"client_dp": {"noise_multiplier": 1.0}}}, "client_dp"),
        ({"contribution": {"methods": ["gtg"], "validation": "v.jsonl"}, "aggregation": {"name": "krum", "num_malicious": 1}}, "coalitions of one"),
    ],
)
def test_contribution_rules_refuse_what_cannot_work(sections: dict[str, Any], message: str) -> None:
    with pytest.raises(FedlmError, match=message):
        validate_config(_config(**sections))


def test_methods_are_named_once() -> None:
    with pytest.raises(Exception, match="more than once"):
        ExperimentConfig.model_validate({"contribution": {"methods": ["gtg", "gtg"]}})


def test_average_ranks_and_spearman() -> None:
    assert average_ranks([3.0, 1.0, 1.0, 2.0]) == [4.0, 1.5, 1.5, 3.0]
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0) and spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_a_resumed_run_restores_the_cumulative_scores_up_to_its_checkpoint(tmp_path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for r, totals in ((1, {"a": 0.5, "b": -0.1}), (2, {"a": 0.7, "b": 0.2})):
        log.append({"round": r, "split": "aggregate", "client": None, "contribution": {"methods": {"gtg": {"cumulative": totals}}}})
    game = quadratic_round(honest=2)
    observer = ContributionObserver(["a", "b", "c"], ["gtg"], game.aggregator, game.lora, {}, None, GtgSettings(), 0, log, RunConsole(quiet=True))  # type: ignore[arg-type]
    observer.on_start(game.start_state, 1)
    assert observer.scores_for_sampling() == {"a": 0.5, "b": -0.1, "c": 0.0}
