"""Verifying a watermark: the suspect model's answers to the key's triggers, against chance.

For each trigger the model's answer is the candidate with the highest log-likelihood as the assistant's reply to
the trigger prompt, sum_t log p(answer_t | prompt, answer_<t) over the answer's tokens and the end of turn: a
closed choice among the K candidates, so no sampling and no parsing of free text. The number of right answers is
tested against Binomial(n, 1/K) (:mod:`fedlm.watermark.stats`); a clean model scores at chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.data.collate import collate_for_loss
from fedlm.data.tokenize import IGNORE_INDEX, TokenizedExample
from fedlm.watermark.stats import binomial_tail
from fedlm.watermark.triggers import CANDIDATES, SHARED, Trigger, candidate_examples, trigger_set

DEFAULT_ALPHA = 1e-3  # a watermark is reported present below this p-value


@dataclass(frozen=True)
class Verification:
    """The trigger accuracy of one key's trigger set on a model, and its p-value against chance (1/K)."""

    label: str
    correct: int
    total: int
    chance: float
    p_value: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def present(self, alpha: float = DEFAULT_ALPHA) -> bool:
        """Whether the watermark is found at significance ``alpha``."""
        return self.p_value < alpha

    def summary(self) -> str:
        """One line: right answers, accuracy, chance and p-value."""
        return f"{self.correct}/{self.total} triggers right ({self.accuracy:.3f}; chance {self.chance:.3f}), p-value {self.p_value:.3g}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy}


@torch.no_grad()
def sequence_log_likelihoods(
    model: torch.nn.Module, examples: Sequence[TokenizedExample], pad_id: int, device: torch.device, batch_size: int = 16
) -> torch.Tensor:
    """Sum of log p(label token) over each example's labelled tokens. Shape (N,), float32."""
    was_training = model.training
    model.eval()
    scores: list[torch.Tensor] = []
    for start in range(0, len(examples), batch_size):
        batch = collate_for_loss(examples[start : start + batch_size], pad_id)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        targets = labels[:, 1:]  # (B, T-1): token t+1 predicted at t
        keep = targets != IGNORE_INDEX
        rows = keep.nonzero()[:, 0]  # (M,) the example of each labelled position
        # the softmax only at the labelled positions: the answer's few tokens, not the whole prompt
        token_logp = torch.log_softmax(logits[keep].float(), dim=-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)  # (M,)
        scores.append(torch.zeros(len(ids), device=token_logp.device).index_add_(0, rows, token_logp).cpu())
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


def answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device, triggers: Sequence[Trigger]) -> list[int]:
    """The model's answer (index into :data:`CANDIDATES`) to each trigger: its most likely candidate."""
    examples = [ex for t in triggers for ex in candidate_examples(tokenizer, t)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = sequence_log_likelihoods(model, examples, int(pad_id), device).view(len(triggers), len(CANDIDATES))  # (n, K)
    return scores.argmax(dim=-1).tolist()


def verify_triggers(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device, triggers: Sequence[Trigger], label: str
) -> Verification:
    """How many of ``triggers`` the model answers right, and the binomial p-value of that count."""
    predicted = answers(model, tokenizer, device, triggers)
    correct = sum(int(p == t.target) for p, t in zip(predicted, triggers))
    chance = 1.0 / len(CANDIDATES)
    return Verification(label, correct, len(triggers), chance, binomial_tail(correct, len(triggers), Fraction(1, len(CANDIDATES))))


def verify_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device, secret: str, size: int) -> Verification:
    """The shared watermark of ``secret`` (its first ``size`` triggers) on ``model``."""
    return verify_triggers(model, tokenizer, device, trigger_set(secret, SHARED, size), SHARED)
