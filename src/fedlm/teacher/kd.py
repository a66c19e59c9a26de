"""Distilling the teacher's answers, mixed with the client's own labels.

A training example is a :class:`TeacherPair`: one of the client's own examples and one teacher-answered example.
The loss of a batch of pairs is

    L = (1 - mix) * CE_own + mix * L_teacher,

CE_own the objective's own loss (token-mean cross-entropy on the client's answers). L_teacher is the token mean,
over the teacher answer's tokens, of

* top-k distillation where the teacher gave its top-k log-probabilities in the student's tokens (Hinton, Vinyals &
  Dean 2015, with the teacher's distribution truncated to its k candidates and renormalised, as API distillation
  must): ``-sum_j p_T(v_j) log p_S(v_j)``, p_T = softmax of the k teacher logprobs;
* sequence-level KD elsewhere (Kim & Rush 2016, Eq. 9 with the teacher's decoded answer as the mode): the
  cross-entropy of the teacher's token.

The examples count as the client's own (``num_examples`` is its own data size): the teacher adds a target per
example, not records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from fedlm.data.collate import collate_for_loss
from fedlm.data.tokenize import IGNORE_INDEX
from fedlm.objectives.base import Batch, Objective
from fedlm.teacher.labeling import TaughtExample

if TYPE_CHECKING:
    from fedlm.config.schema import DataConfig
    from fedlm.data.prepare import TestExample
    from fedlm.data.readers import Record

PREFIX = "teacher_"


@dataclass(frozen=True)
class TeacherPair:
    """One of the client's examples and a teacher-answered one, trained on together."""

    own: Any
    taught: TaughtExample


def collate_taught(examples: Sequence[TaughtExample], pad_id: int) -> Batch:
    """Right-padded teacher examples (B, T) plus their top-k candidates: ``top_ids``/``top_logp`` (B, T, K), K the
    most candidates of any position (missing ones: logprob -inf), and ``has_top`` (B, T)."""
    batch = collate_for_loss([ex.tokens for ex in examples], pad_id)
    rows, width = batch["input_ids"].shape
    k = max((len(c) for ex in examples for c in ex.top.values()), default=1)
    top_ids = torch.zeros((rows, width, k), dtype=torch.long)
    top_logp = torch.full((rows, width, k), float("-inf"))
    has_top = torch.zeros((rows, width), dtype=torch.bool)
    for row, ex in enumerate(examples):
        for t, candidates in ex.top.items():
            top_ids[row, t, : len(candidates)] = torch.tensor([i for i, _ in candidates])
            top_logp[row, t, : len(candidates)] = torch.tensor([lp for _, lp in candidates])
            has_top[row, t] = True
    return {**batch, "top_ids": top_ids, "top_logp": top_logp, "has_top": has_top}


def distillation_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Token mean of top-k KD where ``has_top``, cross-entropy on the label elsewhere. ``logits`` (B, T-1, V) predict
    ``labels[:, 1:]``; the candidates at label position t are compared with the logits at t - 1."""
    target = batch["labels"][:, 1:]  # (B, T-1)
    has_top = batch["has_top"][:, 1:]  # (B, T-1)
    logq = F.log_softmax(logits.float(), dim=-1)  # (B, T-1, V)
    ce = -logq.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    top_logp = torch.where(has_top.unsqueeze(-1), batch["top_logp"][:, 1:], torch.zeros_like(batch["top_logp"][:, 1:]))
    p_teacher = torch.softmax(top_logp, dim=-1)  # (B, T-1, K): renormalised over the k candidates; -inf -> 0
    kd = -(p_teacher * logq.gather(-1, batch["top_ids"][:, 1:])).sum(-1)  # (B, T-1)
    per_token = torch.where(has_top, kd, ce)
    mask = (target != IGNORE_INDEX).float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


class TeacherObjective(Objective):
    """``inner`` (sft) trained on :class:`TeacherPair` batches with the mixed loss; data and evaluation are inner's."""

    name: ClassVar[str] = "teacher"

    def __init__(self, inner: Objective, mix: float) -> None:
        super().__init__(inner.params)
        self.inner = inner
        self.mix = mix

    def check_records(self, records: Sequence[Record], field_name: str, data: DataConfig) -> None:
        self.inner.check_records(records, field_name, data)

    def train_examples(
        self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataConfig, who: str, where: Sequence[str]
    ) -> list[Any]:
        return self.inner.train_examples(records, tokenizer, data, who, where)

    def test_examples(
        self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataConfig, owners: Sequence[str | None], where: str
    ) -> list[TestExample]:
        return self.inner.test_examples(records, tokenizer, data, owners, where)

    def collate(self, examples: Sequence[Any], pad_id: int) -> Batch:
        """The own examples' batch (the inner objective's keys) and the teacher's, its keys prefixed ``teacher_``."""
        own = self.inner.collate([p.own for p in examples], pad_id)
        taught = collate_taught([p.taught for p in examples], pad_id)
        return {**own, **{PREFIX + k: v for k, v in taught.items()}}

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        taught = {k.removeprefix(PREFIX): v for k, v in batch.items() if k.startswith(PREFIX)}
        width = taught["input_ids"].shape[1]
        logits = model(input_ids=taught["input_ids"], attention_mask=taught["attention_mask"]).logits[:, -width:-1]  # (B, T-1, V)
        teacher_loss = distillation_loss(logits, taught)
        metrics = {"teacher_loss": float(teacher_loss.detach())}
        if self.mix == 1.0:
            return teacher_loss, metrics
        own_loss, own_metrics = self.inner.loss(model, {k: v for k, v in batch.items() if not k.startswith(PREFIX)})
        metrics.update(own_metrics, own_loss=float(own_loss.detach()))
        return (1.0 - self.mix) * own_loss + self.mix * teacher_loss, metrics
