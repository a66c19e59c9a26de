"""Multiple-choice accuracy in fedlm's own evaluator, for the global test set and every client's test share.

A test record with ``choices`` (two or more strings) and ``label`` (the index of the right one) is a multiple-choice
question (``embedded:wordnet_mc`` is one such set). Each choice is scored as the assistant's answer to the record's
prompt through the model's chat template: its summed log-likelihood (the answer's tokens and the template's
end-of-turn token, as the SFT loss counts them), divided by the choice's length in characters. The prediction is the
choice with the highest normalised score: the length-normalised accuracy (``acc_norm``) of the lm-evaluation-harness
(Gao et al. 2021, "A framework for few-shot language model evaluation"), which divides by the continuation's
character length too, so long answers are not penalised for having more tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.data.choices import CHOICES, LABEL
from fedlm.data.collate import collate_for_loss
from fedlm.data.formats import Message
from fedlm.data.tokenize import TokenizedExample, tokenize_conversation
from fedlm.objectives.base import sequence_logps


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: each choice tokenised as the answer, its character length, the right index."""

    answers: list[TokenizedExample]
    lengths: list[int]
    label: int


def build_question(tokenizer: PreTrainedTokenizerBase, prompt: list[Message], record: dict[str, Any], max_length: int) -> Question | None:
    """The question of a record with ``choices`` and ``label`` (None for a record without ``choices``)."""
    if CHOICES not in record:
        return None
    choices = [str(c) for c in record[CHOICES]]
    answers = [tokenize_conversation(tokenizer, [*prompt, {"role": "assistant", "content": c}], max_length) for c in choices]
    return Question(answers, [max(len(c), 1) for c in choices], int(record[LABEL]))


def choice_logliks(
    model: torch.nn.Module,
    questions: Sequence[Question],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    advance: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Each question's summed log-likelihood of every choice (no gradient), batched over all choices."""
    flat = [(q, c) for q, question in enumerate(questions) for c in range(len(question.answers))]
    scores: list[list[float]] = [[0.0] * len(q.answers) for q in questions]
    with torch.no_grad():
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate_for_loss([questions[q].answers[c] for q, c in chunk], pad_id).items()}
            logps, _ = sequence_logps(model, batch)  # (B,)
            for (q, c), value in zip(chunk, logps.tolist()):
                scores[q][c] = value
            if advance is not None:
                advance(len(chunk))
    return scores


def predicted_choice(question: Question, logliks: Sequence[float]) -> int:
    """The choice with the highest log-likelihood per character (ties: the first)."""
    normalised = [ll / n for ll, n in zip(logliks, question.lengths)]
    return max(range(len(normalised)), key=normalised.__getitem__)
