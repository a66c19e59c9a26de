"""Tests for fedlm.evaluation.text_metrics."""

from __future__ import annotations

import pytest

from fedlm.evaluation.text_metrics import (
    exact_match,
    generation_metrics,
    normalize_text,
    rouge_l,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Cat!", "cat"),
        ("  The  quick, brown-fox ate an apple.  ", "quick brownfox ate apple"),
        ("A theater and the answer", "theater and answer"),
        ("\tHello,\n  World ", "hello world"),
        ("", ""),
    ],
)
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_exact_match() -> None:
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("a dog", "cat") == 0.0
    assert exact_match("cats", "cat") == 0.0
    assert isinstance(exact_match("x", "x"), float)


def test_rouge_l_equal_precision_recall() -> None:
    # LCS = "the cat on the mat" = 5 tokens; 6 tokens each -> P = R = F = 5/6.
    got = rouge_l("the cat sat on the mat", "the cat is on the mat")
    assert got == pytest.approx(5 / 6, abs=1e-6)


def test_rouge_l_unequal_precision_recall() -> None:
    # prediction: 6 tokens, reference: 3 tokens, LCS = "cat on mat" = 3.
    p, r = 3 / 6, 3 / 3
    expected = 2 * p * r / (p + r)  # = 2/3
    assert rouge_l("big cat sat on red mat", "cat on mat") == pytest.approx(expected, abs=1e-6)
    # F-measure is symmetric in prediction and reference.
    assert rouge_l("cat on mat", "big cat sat on red mat") == pytest.approx(expected, abs=1e-6)


def test_rouge_l_is_order_sensitive() -> None:
    # Same bag of words, reversed order: LCS = 1 token, so P = R = F = 1/3
    # (ROUGE-1 would give 1.0 here).
    assert rouge_l("mat on cat", "cat on mat") == pytest.approx(1 / 3, abs=1e-6)


def test_rouge_l_case_punctuation_and_edge_cases() -> None:
    assert rouge_l("The CAT, on the mat!", "the cat on the mat") == pytest.approx(1.0)
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("   ", "the cat") == 0.0
    assert rouge_l("dog", "cat") == 0.0


def test_generation_metrics_means() -> None:
    preds = ["The Cat!", "the cat sat on the mat", "dog"]
    refs = ["cat", "the cat is on the mat", "cat"]
    got = generation_metrics(preds, refs)
    assert set(got) == {"exact_match", "rouge_l"}
    assert got["exact_match"] == pytest.approx(1 / 3)
    # "The Cat!" vs "cat": rouge tokens [the, cat] vs [cat] -> P=1/2, R=1, F=2/3.
    assert got["rouge_l"] == pytest.approx((2 / 3 + 5 / 6 + 0.0) / 3, abs=1e-6)


def test_generation_metrics_errors() -> None:
    with pytest.raises(ValueError):
        generation_metrics([], [])
    with pytest.raises(ValueError, match=r"3.*2"):
        generation_metrics(["a", "b", "c"], ["a", "b"])
