"""The pure maths of privacy audits: membership-inference scores, their ROC summary, and canary exposure.

An audit asks how much a trained model gives away about the text it was trained on. Two questions, two tools:

- membership inference: given one example, was it in the training set? Each score below maps per-example model
  quantities to one number, with the convention everywhere that a **higher score means "more likely a member"**;
  :func:`mia_report` summarises how well a score separates known members from known non-members (ROC AUC and the
  true-positive rate at a low false-positive rate, the number that matters for privacy; Carlini, Chien, Nasr, Song,
  Terzis & Tramer 2022, "Membership Inference Attacks From First Principles", S&P);
- canaries (Carlini, Liu, Erlingsson, Kos & Song 2019, "The Secret Sharer: Evaluating and Testing Unintended
  Memorization in Neural Networks", USENIX Security, Sec. 4): random secrets such as ``"my secret code is 48213"``
  are planted in a client's data, and after training the canary's score is ranked among the scores of the
  candidate secrets that were never planted; :func:`exposure` turns that rank into bits.

All functions here are pure and take plain numbers, sequences or 1-D arrays (a CPU tensor works through
``numpy.asarray``); computing token log-probabilities with a model is the caller's job. All logarithms of
likelihoods are natural (nats) unless a docstring says bits.

Scores:

- :func:`loss_score`: the loss attack (Yeom, Giacomelli, Fredrikson & Jha 2018, "Privacy Risk in Machine Learning:
  Analyzing the Connection to Overfitting", CSF, a threshold on the loss): ``-mean(NLL)``.
- :func:`zlib_score`: the zlib ratio (Carlini et al. 2021, "Extracting Training Data from Large Language Models",
  USENIX Security, the "zlib" membership metric): the model's code length of the text over zlib's.
- :func:`min_k_score`: Min-K% Prob (Shi, Ajith, Xia, Huang, Liu, Blevins, Chen & Zettlemoyer 2024, "Detecting
  Pretraining Data from Large Language Models", ICLR): the mean of the lowest k-fraction of the
  token log-probabilities.
"""

from __future__ import annotations

import math
import operator
import string
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from fedlm.core.errors import FedlmError

REPORT_FPRS: tuple[float, ...] = (0.01, 0.001)
"""The false-positive rates at which :func:`mia_report` reads the true-positive rate (1% and 0.1%)."""
CANARY_PREFIX = "my secret code is "
"""The fixed format of a canary: this prefix followed by the random secret."""
CANARY_ALPHABET = string.digits
"""The default alphabet of a canary's secret (ten digits, as the Secret Sharer's numeric secrets)."""
LOGPROB_TOLERANCE = 1e-6
"""How far above 0 a log-probability (or below 0 an NLL) may stray from float rounding before it is rejected."""


class AuditInputError(FedlmError, ValueError):
    """A bad input to an audit computation: a ValueError for callers, one ``error:`` line in the CLI."""


# --------------------------------------------------------------------------------------------- validation


def _scores_1d(values: Any, name: str, *, allow_empty: bool = False) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise AuditInputError(f"`{name}` must be a 1-D sequence of numbers, got {type(values).__name__}") from None
    if array.ndim != 1:
        raise AuditInputError(f"`{name}` must be 1-D (one number per example or token), got shape {array.shape}")
    if array.size == 0 and not allow_empty:
        raise AuditInputError(f"`{name}` must not be empty")
    if not np.all(np.isfinite(array)):
        raise AuditInputError(f"`{name}` must hold only finite numbers (no NaN or inf)")
    return array


def _finite_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise AuditInputError(f"`{name}` must be a number, got {value!r}")
    if not math.isfinite(value):
        raise AuditInputError(f"`{name}` must be finite, got {value}")
    return float(value)


def _whole_number(value: Any, name: str, *, minimum: int) -> int:
    try:
        count = operator.index(value)
    except TypeError:
        raise AuditInputError(f"`{name}` must be a whole number >= {minimum}, got {value!r}") from None
    if isinstance(value, bool) or count < minimum:
        raise AuditInputError(f"`{name}` must be a whole number >= {minimum}, got {value!r}")
    return count


# --------------------------------------------------------------------------------------------- MIA scores


def loss_score(nll_per_token: Sequence[float] | np.ndarray) -> float:
    """The loss attack score of one example: ``-mean(NLL)`` over its tokens (Yeom et al. 2018).

    Args:
        nll_per_token: the negative log-likelihood (nats, >= 0) of each scored token of the example.

    Returns:
        ``-mean(nll_per_token)``; a lower loss (higher score) means "more likely a member".
    """
    nll = _scores_1d(nll_per_token, "nll_per_token")
    if np.any(nll < -LOGPROB_TOLERANCE):
        raise AuditInputError("`nll_per_token` must be >= 0 (negative log-likelihoods); pass -log p, not log p")
    return -float(np.mean(nll))


def zlib_score(nll_sum: float, text: str) -> float:
    """The zlib-ratio score of one example (Carlini et al. 2021): model code length over zlib's.

    Both code lengths are in **bits**: the model's is ``nll_sum / ln 2`` (the summed NLL converted from nats), zlib's is
    ``8 * len(zlib.compress(text.encode("utf-8")))`` at zlib's default level. The score is

        ``-(nll_sum / ln 2) / (8 * len(zlib.compress(text.encode("utf-8"))))``

    a dimensionless ratio (bits per bit): text the model finds far easier than zlib does (memorised, yet not merely
    repetitive) scores higher. Carlini et al.'s code divides the log-perplexity (mean NLL) by the zlib byte count;
    this form uses the sum so both numerator and denominator measure the whole text in the same unit. Within one
    tokenizer the two orderings agree up to the token count per text.

    Args:
        nll_sum: the summed negative log-likelihood of the text's tokens, in nats (>= 0).
        text: the text itself (non-empty).

    Returns:
        The negated ratio; higher means "more likely a member".
    """
    total = _finite_number(nll_sum, "nll_sum")
    if total < -LOGPROB_TOLERANCE:
        raise AuditInputError(f"`nll_sum` must be >= 0 (a summed negative log-likelihood in nats), got {total}")
    if not isinstance(text, str) or not text:
        raise AuditInputError(f"`text` must be a non-empty string, got {text!r}")
    zlib_bits = 8 * len(zlib.compress(text.encode("utf-8")))
    return -(total / math.log(2)) / zlib_bits


def min_k_score(token_logprobs: Sequence[float] | np.ndarray, k: float = 0.2) -> float:
    """Min-K% Prob (Shi et al. 2024): the mean of the lowest ``k``-fraction of the token log-probabilities.

    The number of tokens kept is ``max(1, floor(k * n))`` for ``n`` tokens (the reference code's
    ``int(len(all_prob) * ratio)``, guarded so a short text keeps its least likely token). A member has fewer
    surprising outlier tokens, so its lowest log-probabilities are higher.

    Args:
        token_logprobs: ``log p(x_i | x_<i)`` (nats, <= 0) of each scored token.
        k: the fraction of tokens kept, in (0, 1]; 0.2 is the paper's default, ``k = 1`` gives ``-loss``.

    Returns:
        The mean of the kept log-probabilities; higher means "more likely a member".
    """
    logprobs = _scores_1d(token_logprobs, "token_logprobs")
    if np.any(logprobs > LOGPROB_TOLERANCE):
        raise AuditInputError("`token_logprobs` must be <= 0 (log-probabilities); pass log p, not -log p")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise AuditInputError(f"`k` must lie in (0, 1] (the fraction of lowest-probability tokens kept), got {k!r}")
    kept = max(1, math.floor(k * logprobs.size + 1e-9))  # the 1e-9 absorbs float error such as 0.29 * 100 = 28.99..
    return float(np.mean(np.sort(logprobs)[:kept]))


# --------------------------------------------------------------------------------------------- MIA report


def _labels_and_scores(member_scores: Any, nonmember_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    members = _scores_1d(member_scores, "member_scores", allow_empty=True)
    nonmembers = _scores_1d(nonmember_scores, "nonmember_scores", allow_empty=True)
    if members.size == 0 or nonmembers.size == 0:
        raise AuditInputError(
            f"`member_scores` and `nonmember_scores` must both be non-empty to draw a ROC curve, "
            f"got {members.size} members and {nonmembers.size} non-members"
        )
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    return labels, np.concatenate([members, nonmembers])


def tpr_at_fpr(member_scores: Any, nonmember_scores: Any, target_fpr: float) -> float:
    """The largest true-positive rate among ROC points whose false-positive rate is ``<= target_fpr``.

    The ROC comes from ``sklearn.metrics.roc_curve`` (members are positives) with every threshold kept. No
    interpolation: the value is read off the empirical step curve at the last threshold that stays within the
    target, so it is attainable by an actual threshold and never optimistic (as Carlini et al. 2022 report
    TPR at low FPR). The point (0, 0) is always on the curve, so with fewer than ``1 / target_fpr`` non-members the
    answer is the TPR at zero false positives.
    """
    labels, scores = _labels_and_scores(member_scores, nonmember_scores)
    target = _finite_number(target_fpr, "target_fpr")
    if not 0 <= target <= 1:
        raise AuditInputError(f"`target_fpr` must lie in [0, 1], got {target}")
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(np.max(tpr[fpr <= target]))


def mia_report(member_scores: Any, nonmember_scores: Any) -> dict[str, float | int]:
    """How well a membership score separates known members from known non-members.

    Args:
        member_scores: one score per training example (higher = "more likely a member").
        nonmember_scores: one score per held-out example from the same distribution.

    Returns:
        ``{"auc", "tpr_at_fpr_0.01", "tpr_at_fpr_0.001", "n_members", "n_nonmembers"}``: ROC AUC from
        ``sklearn.metrics.roc_auc_score`` (0.5 = chance, ties count half), and :func:`tpr_at_fpr` at 1% and 0.1%.
        With ``n_nonmembers`` non-members the smallest non-zero FPR is ``1 / n_nonmembers``; below it the TPR is read
        at zero false positives.
    """
    labels, scores = _labels_and_scores(member_scores, nonmember_scores)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    report: dict[str, float | int] = {"auc": float(roc_auc_score(labels, scores))}
    for target in REPORT_FPRS:
        report[f"tpr_at_fpr_{target:g}"] = float(np.max(tpr[fpr <= target]))
    report["n_members"] = int(labels.sum())
    report["n_nonmembers"] = int(labels.size - labels.sum())
    return report


# --------------------------------------------------------------------------------------------- canaries


def make_canaries(n: int, seed: int, length: int = 6, *, alphabet: str = CANARY_ALPHABET) -> list[str]:
    """``n`` distinct canaries ``CANARY_PREFIX + secret``, each secret ``length`` symbols drawn from ``alphabet``.

    The secrets are drawn uniformly (Carlini et al. 2019, Sec. 4: the randomness space R is every string of the
    format) from ``numpy.random.default_rng(seed)``: the same seed gives the same canaries, in the same order, and
    no global RNG is touched. Reference candidates for :func:`exposure` are other draws from the same space.
    """
    count = _whole_number(n, "n", minimum=0)
    size = _whole_number(length, "length", minimum=1)
    seed_value = _whole_number(seed, "seed", minimum=0)
    if not isinstance(alphabet, str) or len(set(alphabet)) < 2 or len(set(alphabet)) != len(alphabet):
        raise AuditInputError(f"`alphabet` must be a string of at least 2 distinct symbols, got {alphabet!r}")
    space = len(alphabet) ** size
    if count > space:
        raise AuditInputError(
            f"`n` ({count}) exceeds the {space} distinct secrets of length {size} over {len(alphabet)} symbols; raise `length` or use fewer canaries"
        )
    rng = np.random.default_rng(seed_value)
    symbols = np.array(list(alphabet))
    seen: set[str] = set()
    canaries: list[str] = []
    while len(canaries) < count:
        secret = "".join(symbols[rng.integers(len(alphabet), size=size)])
        if secret not in seen:
            seen.add(secret)
            canaries.append(CANARY_PREFIX + secret)
    return canaries


def exposure(canary_score: float, reference_scores: Any) -> float:
    """The exposure of a canary in bits (Carlini et al. 2019, Sec. 4): ``log2 |R| - log2 rank``.

    ``R`` is the canary plus the reference candidates (secrets of the same format that were never planted), so
    ``|R| = len(reference_scores) + 1``, and ``rank = 1 + #{references scoring >= canary_score}`` (higher score =
    more likely; ties count against the canary, so exposure is never overstated). A canary ranked first among
    1023 references has exposure log2(1024) = 10 bits; ranked last, 0 bits. The maximum is ``log2 |R|``.

    Args:
        canary_score: the model's score of the planted canary (e.g. its log-likelihood, or a score from above).
        reference_scores: the same score for each reference candidate (at least one).
    """
    canary = _finite_number(canary_score, "canary_score")
    references = _scores_1d(reference_scores, "reference_scores")
    rank = 1 + int(np.count_nonzero(references >= canary))
    return math.log2(references.size + 1) - math.log2(rank)
