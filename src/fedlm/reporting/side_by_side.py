"""Held-out questions with the base, local-only and federated answers side by side (``fedlm compare``), so that a
reader sees an answer get better, not only a number move.

Each example is scored per model: a multiple-choice question by whether the model's pick is right (``mc_correct``),
otherwise by the ROUGE-L of its generated answer. The examples shown are drawn with a fixed seed among those where
the federated model scores above the base model (then, if too few, among the rest), so the same config always shows
the same questions.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedlm.reporting.tables import markdown_table

ARMS = ("base", "local-only", "federated")


def example_score(row: Mapping[str, Any], text_score: Callable[[str, str], float]) -> float | None:
    """How good one model's answer to one example is: MC correctness, else ``text_score(prediction, reference)`` of
    the generation (ROUGE-L in ``fedlm compare``), else None."""
    if "mc_correct" in row:
        return float(row["mc_correct"])
    prediction = row.get("prediction")
    return text_score(prediction, str(row.get("reference", ""))) if isinstance(prediction, str) else None


def pick_examples(rows: Mapping[str, Sequence[Mapping[str, Any]]], count: int, seed: int, text_score: Callable[[str, str], float]) -> list[int]:
    """Indices of ``count`` test examples (``rows[arm][i]`` is arm's row for example i), the federated model's gains
    first, each group in a seeded order."""
    base, federated = rows["base"], rows["federated"]
    order = list(range(min(len(base), len(federated))))
    random.Random(seed).shuffle(order)
    scores = [(example_score(base[i], text_score), example_score(federated[i], text_score)) for i in order]
    gains = [i for i, (b, f) in zip(order, scores) if b is not None and f is not None and f > b]
    rest = [i for i in order if i not in set(gains)]
    return (gains + rest)[:count]


def answer(row: Mapping[str, Any] | None) -> str:
    """One model's answer as a table cell: the chosen choice (right or wrong) or the generated text."""
    if row is None:
        return "–"
    choices = row.get("choices")
    if "mc_choice" in row and isinstance(choices, list):
        mark = "right" if row.get("mc_correct") else "wrong"
        return f"{_short(str(choices[int(row['mc_choice'])]))} ({mark})"
    prediction = row.get("prediction")
    return _short(prediction) if isinstance(prediction, str) else "–"


def side_by_side_markdown(
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    local_rows: Mapping[str, Sequence[Mapping[str, Any]]],
    count: int,
    seed: int,
    text_score: Callable[[str, str], float],
) -> str | None:
    """The table of ``count`` examples (``local_rows[client]``: the client's own local-only model's rows, shown for
    examples of that client's test share; the other clients' local-only models are counted: how many of them get the
    example fully right, a perfect score), or None when no model answered (no generation, no choices)."""
    picked = pick_examples(rows, count, seed, text_score)
    if not picked or all(answer(rows["federated"][i]) == "–" for i in picked):
        return None
    table = []
    for i in picked:
        base = rows["base"][i]
        client = base.get("client")
        local = local_rows.get(str(client), [])
        table.append(
            {
                "question": first_sentence(str(base.get("prompt", "")), 70),
                "reference": _short(str(base.get("reference", ""))),
                "base": answer(base),
                OWN: answer(local[i] if i < len(local) else None),
                OTHERS: others_right(local_rows, str(client), i, text_score),
                "federated": answer(rows["federated"][i]),
            }
        )
    return markdown_table(table, ["question", "reference", "base", OWN, OTHERS, "federated"])


OWN = "local-only (its client)"
OTHERS = "local-only (other clients)"


def others_right(local_rows: Mapping[str, Sequence[Mapping[str, Any]]], client: str, i: int, text_score: Callable[[str, str], float]) -> str:
    """``"k of n right"``: of the local-only models of the clients other than ``client``, how many answer example
    ``i`` fully right (score 1); "–" when there are none."""
    scores = [example_score(rows[i], text_score) for name, rows in local_rows.items() if name != client and i < len(rows)]
    scored = [s for s in scores if s is not None]
    return f"{sum(s >= 1.0 for s in scored)} of {len(scored)} right" if scored else "–"


def first_sentence(text: str, limit: int) -> str:
    """The question's first sentence when it fits in ``limit`` characters (the rest is often the same instructions
    for every question), else its first ``limit`` characters."""
    text = " ".join(text.split())
    ends = [i for i in (text.find("?"), text.find(". ")) if i >= 0]
    end = min(ends) + 1 if ends else len(text)
    return text[:end] if end <= limit else _short(text, limit)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
