"""The retain set as distillation: keep the marked model's next-token distributions where the unmarked one had them.

Trained with the SFT loss on the model's own sampled answers (``retain_loss: sft``), the retain set has a gradient
even before the first step: the sampled tokens are one draw, not the model's distribution, and an adaptive optimizer
turns that noise into full-size steps. Distilling the distributions themselves (``retain_loss: kl``; knowledge
distillation, Hinton, Vinyals & Dean 2015; a KL term to the model before the change, as LwF, Li & Hoiem 2017, keeps a
network's old behaviour while it learns a new task) has zero loss and zero gradient at the unmarked model and grows
only as the mark moves the model's answers, so it pulls back exactly the drift the triggers cause.

The reference is the state being marked: before an embedding the model holding it scores each retain conversation
once and keeps, at every answer position, its ``k`` most likely next tokens and their log-probabilities. The loss
at such a position is KL(p_ref || p) over those ``k`` tokens, each distribution renormalised on them (a proper
divergence: zero exactly when the two agree there). Trigger positions keep the SFT cross-entropy; the step's loss is
the mean over all supervised positions, as the SFT loss is over its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.data.collate import collate_for_loss
from fedlm.data.tokenize import IGNORE_INDEX, TokenizedExample
from fedlm.objectives.base import Batch, Objective

if TYPE_CHECKING:
    from fedlm.config.schema import DataConfig
    from fedlm.data.prepare import TestExample
    from fedlm.data.readers import Record

TOP_K = 32  # reference tokens kept per answer position


@dataclass(frozen=True)
class DistilledExample(TokenizedExample):
    """A retain conversation with the reference's top-k next tokens at each supervised position, in order."""

    top_ids: torch.Tensor  # (n, k) long: n = the example's supervised next-token positions
    top_logp: torch.Tensor  # (n, k) float32


@torch.no_grad()
def distilled(
    model: torch.nn.Module, examples: Sequence[TokenizedExample], pad_id: int, device: torch.device, k: int = TOP_K, batch_size: int = 8
) -> list[DistilledExample]:
    """``examples`` with the top-``k`` next tokens of ``model`` (the reference, as loaded) at their answer positions."""
    was_training = model.training
    model.eval()
    out: list[DistilledExample] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate_for_loss(chunk, pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
        supervised = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1)
        for row, example in enumerate(chunk):
            logp = torch.log_softmax(logits[row][supervised[row].to(logits.device)].float(), dim=-1)  # (n, V)
            top = logp.topk(k, dim=-1)
            out.append(DistilledExample(example.input_ids, example.labels, top.indices.cpu(), top.values.cpu()))
    model.train(was_training)
    return out


class MarkObjective(Objective):
    """The embedding's loss: cross-entropy on the triggers' answers (and on plain retain examples), the top-k KL to
    the reference on :class:`DistilledExample` positions; the mean over every supervised position."""

    name = "watermark-mark"

    def check_records(self, records: Sequence[Record], field_name: str, data: DataConfig) -> None:
        raise TypeError("the watermark's objective trains on trigger and retain examples only, never on records")

    def train_examples(
        self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataConfig, who: str, where: Sequence[str]
    ) -> list[TokenizedExample]:
        raise TypeError("the watermark's objective trains on trigger and retain examples only, never on records")

    def test_examples(
        self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataConfig, owners: Sequence[str | None], where: str
    ) -> list[TestExample]:
        raise TypeError("the watermark's objective is never evaluated on records")

    def collate(self, examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
        """The SFT batch plus, for distilled rows, ``kl`` (B, T-1) marking their supervised positions and the
        reference's ``top_ids`` / ``top_logp`` (B, T-1, k) there."""
        batch = collate_for_loss(examples, pad_id)
        rows, width = batch["input_ids"].shape
        supervised = batch["labels"][:, 1:] != IGNORE_INDEX
        kl = torch.zeros(rows, width - 1, dtype=torch.bool)
        k = next((ex.top_ids.shape[1] for ex in examples if isinstance(ex, DistilledExample)), 0)
        if k == 0:
            return {**batch, "kl": kl}
        top_ids = torch.zeros(rows, width - 1, k, dtype=torch.long)
        top_logp = torch.zeros(rows, width - 1, k, dtype=torch.float32)
        for row, ex in enumerate(examples):
            if isinstance(ex, DistilledExample):
                positions = supervised[row].nonzero().squeeze(1)
                kl[row, positions] = True
                top_ids[row, positions] = ex.top_ids
                top_logp[row, positions] = ex.top_logp
        return {**batch, "kl": kl, "top_ids": top_ids, "top_logp": top_logp}

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if not batch["kl"].any():  # triggers (and sft retain rows) only: the SFT loss, computed as the SFT objective does
            return super().loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        supervised = target != IGNORE_INDEX
        logp = torch.log_softmax(logits[supervised].float(), dim=-1)  # (M, V)
        per_position = -logp.gather(-1, target[supervised].unsqueeze(-1)).squeeze(-1)  # (M,) cross-entropy
        kl_mask = batch["kl"][supervised]  # (M,)
        metrics: dict[str, float] = {}
        if kl_mask.any():
            ids = batch["top_ids"][supervised][kl_mask]  # (m, k)
            ref = torch.log_softmax(batch["top_logp"][supervised][kl_mask], dim=-1)  # renormalised on the k tokens
            cur = torch.log_softmax(logp[kl_mask].gather(-1, ids), dim=-1)
            divergence = (ref.exp() * (ref - cur)).sum(dim=-1)  # (m,)
            per_position = per_position.masked_scatter(kl_mask, divergence)
            metrics["retain_kl"] = float(divergence.detach().mean())
        if (~kl_mask).any():
            metrics["ce_loss"] = float(per_position.detach()[~kl_mask].mean())
        return per_position.mean(), metrics
