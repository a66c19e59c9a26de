"""Privacy-audit maths against hand-computed values: MIA scores, the ROC summary, canaries and exposure."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from fedlm.core.errors import FedlmError
from fedlm.privacy.audit import (
    CANARY_PREFIX,
    AuditInputError,
    exposure,
    loss_score,
    make_canaries,
    mia_report,
    min_k_score,
    tpr_at_fpr,
    zlib_score,
)

# --------------------------------------------------------------------------------------------- scores


def test_loss_score_is_minus_mean_nll() -> None:
    assert loss_score([1.0, 2.0, 3.0]) == pytest.approx(-2.0)
    assert loss_score(np.array([0.5])) == pytest.approx(-0.5)


def test_zlib_score_is_model_bits_over_zlib_bits() -> None:
    text = "hello hello hello"
    zlib_bytes = len(zlib.compress(text.encode("utf-8")))
    nll_sum = 10 * math.log(2)  # 10 bits
    assert zlib_score(nll_sum, text) == pytest.approx(-10 / (8 * zlib_bytes))
    assert zlib_score(0.0, text) == 0.0


def test_zlib_score_prefers_text_the_model_finds_easier() -> None:
    assert zlib_score(5.0, "the same text") > zlib_score(50.0, "the same text")


def test_min_k_score_hand_values() -> None:
    logprobs = [-0.1, -5.0, -0.2, -3.0, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8]
    assert min_k_score(logprobs, k=0.2) == pytest.approx(-4.0)  # floor(0.2 * 10) = 2 lowest: -5, -3
    assert min_k_score(logprobs, k=0.3) == pytest.approx((-5.0 - 3.0 - 0.8) / 3)
    assert min_k_score(logprobs, k=1.0) == pytest.approx(np.mean(logprobs))
    assert min_k_score([-1.0, -2.0, -3.0], k=0.2) == pytest.approx(-3.0)  # floor(0.6) = 0 -> keep one token


def test_min_k_with_k_one_equals_loss_score() -> None:
    logprobs = np.array([-0.25, -1.5, -2.0])
    assert min_k_score(logprobs, k=1.0) == pytest.approx(loss_score(-logprobs))


# --------------------------------------------------------------------------------------------- MIA report


def test_report_separable_sets_have_auc_one() -> None:
    report = mia_report([5.0, 6.0, 7.0], [1.0, 2.0, 3.0, 4.0])
    assert report["auc"] == 1.0
    assert report["tpr_at_fpr_0.01"] == 1.0
    assert report["tpr_at_fpr_0.001"] == 1.0
    assert report["n_members"] == 3
    assert report["n_nonmembers"] == 4


def test_report_identical_sets_have_auc_one_half() -> None:
    scores = [0.1, 0.4, 0.9, 1.3]
    report = mia_report(scores, scores)
    assert report["auc"] == pytest.approx(0.5)
    assert report["tpr_at_fpr_0.01"] == 0.0  # every threshold that catches a member also flags a non-member


def test_tpr_at_fpr_on_hand_made_roc() -> None:
    # Members 10, 9, 7, 5; non-members 8, 6, 4, 3, 2, 1 (descending thresholds):
    # >= 9 -> (FPR 0, TPR 2/4); >= 8 -> (1/6, 2/4); >= 7 -> (1/6, 3/4); >= 6 -> (2/6, 3/4); >= 5 -> (2/6, 1).
    members, nonmembers = [10, 9, 7, 5], [8, 6, 4, 3, 2, 1]
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.5
    assert tpr_at_fpr(members, nonmembers, 0.1) == 0.5  # no interpolation towards (1/6, 3/4)
    assert tpr_at_fpr(members, nonmembers, 1 / 6) == 0.75
    assert tpr_at_fpr(members, nonmembers, 0.3) == 0.75
    assert tpr_at_fpr(members, nonmembers, 2 / 6) == 1.0
    report = mia_report(members, nonmembers)
    assert report["tpr_at_fpr_0.01"] == 0.5
    assert report["tpr_at_fpr_0.001"] == 0.5
    # AUC = P(member > non-member): 10 and 9 beat all 6, 7 beats 5, 5 beats 4 -> 21 / 24
    assert report["auc"] == pytest.approx(21 / 24)


def test_tpr_at_one_percent_with_many_nonmembers() -> None:
    nonmembers = np.arange(1000, dtype=float)  # 0..999
    members = np.array([995.5, 990.5, 980.5, 2000.0])  # above 4, 9 and 19 non-members; one above all
    report = mia_report(members, nonmembers)
    assert report["tpr_at_fpr_0.001"] == 0.25  # 1 false positive allowed: only 2000 is caught
    assert report["tpr_at_fpr_0.01"] == 0.75  # 10 allowed: 2000, 995.5, 990.5


# --------------------------------------------------------------------------------------------- canaries


def test_canaries_are_deterministic_under_a_seed() -> None:
    first = make_canaries(20, seed=7, length=5)
    assert first == make_canaries(20, seed=7, length=5)
    assert first != make_canaries(20, seed=8, length=5)
    assert len(set(first)) == 20
    for canary in first:
        assert canary.startswith(CANARY_PREFIX) and canary.startswith("my secret code is ")
        secret = canary[len(CANARY_PREFIX) :]
        assert len(secret) == 5 and secret.isdigit()


def test_canaries_custom_alphabet_and_full_space() -> None:
    canaries = make_canaries(4, seed=0, length=2, alphabet="ab")
    assert sorted(c[len(CANARY_PREFIX) :] for c in canaries) == ["aa", "ab", "ba", "bb"]
    assert make_canaries(0, seed=0) == []


def test_exposure_first_and_last_of_1023_references() -> None:
    references = np.linspace(0.0, 1.0, 1023)
    assert exposure(2.0, references) == pytest.approx(10.0)
    assert exposure(-1.0, references) == pytest.approx(0.0)


def test_exposure_middle_rank_and_ties() -> None:
    # 3 references, |R| = 4: two score at least as high as the canary -> rank 3.
    assert exposure(0.5, [0.9, 0.5, 0.1]) == pytest.approx(math.log2(4) - math.log2(3))
    assert exposure(0.5, [0.5, 0.5, 0.5]) == pytest.approx(0.0)  # ties count against the canary


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: loss_score([]), "nll_per_token"),
        (lambda: loss_score([1.0, float("nan")]), "nll_per_token"),
        (lambda: loss_score([-1.0]), "nll_per_token"),
        (lambda: loss_score([[1.0]]), "nll_per_token"),
        (lambda: zlib_score(-1.0, "text"), "nll_sum"),
        (lambda: zlib_score(1.0, ""), "text"),
        (lambda: min_k_score([0.5], k=0.2), "token_logprobs"),
        (lambda: min_k_score([-0.5], k=0.0), "k"),
        (lambda: min_k_score([-0.5], k=1.5), "k"),
        (lambda: mia_report([], [1.0]), "member_scores"),
        (lambda: mia_report([1.0], []), "nonmember_scores"),
        (lambda: tpr_at_fpr([1.0], [0.0], 2.0), "target_fpr"),
        (lambda: make_canaries(-1, seed=0), "n"),
        (lambda: make_canaries(5, seed=0, length=2, alphabet="ab"), "n"),
        (lambda: make_canaries(1, seed=0, length=0), "length"),
        (lambda: make_canaries(1, seed=0, alphabet="a"), "alphabet"),
        (lambda: exposure(1.0, []), "reference_scores"),
        (lambda: exposure(float("inf"), [1.0]), "canary_score"),
    ],
)
def test_bad_input_names_the_parameter(call, field: str) -> None:
    with pytest.raises(AuditInputError, match=f"`{field}`") as info:
        call()
    assert isinstance(info.value, FedlmError) and isinstance(info.value, ValueError)
