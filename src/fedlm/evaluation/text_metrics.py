"""Text-generation metrics: SQuAD-style exact match and ROUGE-L.

``normalize_text`` and ``exact_match`` follow the official SQuAD v1.1
evaluation script (Rajpurkar et al., 2016). ROUGE-L is computed with the
``rouge_score`` package (Lin, 2004), F-measure, Porter stemming enabled.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - import for type checkers only
    from rouge_score.rouge_scorer import RougeScorer

__all__ = ["normalize_text", "exact_match", "rouge_l", "generation_metrics"]

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_SCORER: RougeScorer | None = None


def normalize_text(s: str) -> str:
    """Normalise text the way the SQuAD evaluation script does.

    Lower-cases, removes ASCII punctuation, removes the articles
    ``a``/``an``/``the`` and collapses runs of whitespace to single spaces.

    Args:
        s: Raw text.

    Returns:
        The normalised text (no leading/trailing whitespace).
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, reference: str) -> float:
    """Exact match of prediction and reference after normalisation.

    Args:
        prediction: Generated text.
        reference: Gold text.

    Returns:
        1.0 if the normalised strings are equal, else 0.0.
    """
    return float(normalize_text(prediction) == normalize_text(reference))


def _scorer() -> RougeScorer:
    """Return the module-level ROUGE-L scorer, building it on first use."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer  # noqa: PLC0415 - loads NLTK; only when ROUGE is computed

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of a prediction against one reference.

    Args:
        prediction: Generated text.
        reference: Gold text.

    Returns:
        The LCS-based F-measure in [0, 1]; 0.0 for an empty (or
        whitespace-only) prediction.
    """
    if not prediction.strip():
        return 0.0
    # rouge_score's signature is score(target, prediction).
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus-level mean exact match and ROUGE-L.

    Args:
        predictions: Generated texts.
        references: Gold texts, aligned with ``predictions``.

    Returns:
        ``{"exact_match": mean, "rouge_l": mean}``.

    Raises:
        ValueError: If the inputs are empty or their lengths differ.
    """
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references differ in length: {len(predictions)} predictions vs {len(references)} references")
    if not predictions:
        raise ValueError("generation_metrics needs at least one prediction")
    n = len(predictions)
    em = sum(exact_match(p, r) for p, r in zip(predictions, references)) / n
    rl = sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n
    return {"exact_match": em, "rouge_l": rl}
