"""Distilling the emulator's middle into the full model's on the server's public text.

Offsite-Tuning (Xiao et al. 2023, Sec. 3.3) initialises the emulator's middle by uniform layer drop and trains it by
knowledge distillation so that it stands in for the full middle: the student (the emulator) matches the teacher's
(the full model's) hidden state where the middle ends, i.e. the input of the first top adapter layer, by mean
squared error over the real (non-padding) tokens:

    L = sum_{b,t} m_{b,t} || h_student(b, t) - h_teacher(b, t) ||^2 / (H sum_{b,t} m_{b,t})   # m: attention mask, H: hidden

Only the base weights of the kept middle layers train; the bottom and top layers (and any adapter) stay fixed, so
both models see the same input to the middle. FedBiOT (Wu et al. 2024, Sec. 4.2) runs the same alignment between
rounds with the current global adapter plugged into both models (:mod:`fedlm.offsite.fedbiot`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedlm.core.errors import FedlmError
from fedlm.data.readers import read_records
from fedlm.offsite.emulator import decoder_of, layers_of, parameters_of_layers
from fedlm.offsite.layers import LayerPlan

Batch = dict[str, torch.Tensor]


class _Reached(Exception):
    """Raised by the capture hook to stop a forward pass where the middle ends (the top layers are not needed)."""


@dataclass
class PublicText:
    """The server's public text, tokenized into seeded batches of ``batch_size`` sequences of <= ``max_length`` tokens."""

    texts: list[str]
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    batch_size: int

    @classmethod
    def read(cls, source: str, tokenizer: PreTrainedTokenizerBase, max_length: int, batch_size: int) -> PublicText:
        """The ``text`` fields of ``source`` (``offsite.public_data``)."""
        records = read_records(source, "offsite.public_data")
        texts = [r["text"] for r in records if isinstance(r.get("text"), str) and r["text"].strip()]
        if not texts:
            raise FedlmError(f"`offsite.public_data` {source!r} has no record with a non-empty `text` field; give plain text records")
        return cls(texts, tokenizer, max_length, batch_size)

    def batches(self, count: int, seed: int) -> list[Batch]:
        """``count`` batches of texts drawn without replacement (cycling when the text runs out), seeded by ``seed``."""
        rng = random.Random(seed)
        order: list[int] = []
        while len(order) < count * self.batch_size:
            order.extend(rng.sample(range(len(self.texts)), len(self.texts)))
        out: list[Batch] = []
        for b in range(count):
            chunk = [self.texts[i] for i in order[b * self.batch_size : (b + 1) * self.batch_size]]
            encoded = self.tokenizer(chunk, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
            out.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
        return out


def middle_output(model: nn.Module, n_top: int, batch: Batch) -> torch.Tensor:
    """The hidden state where ``model``'s middle ends (the input of its first top layer, or of the final norm when
    ``n_top`` is 0), (B, T, H); the forward stops there."""
    decoder, layers = decoder_of(model), layers_of(model)
    target = layers[len(layers) - n_top] if n_top > 0 else decoder.get_submodule("norm")
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Reached

    handle = target.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except _Reached:
        pass
    finally:
        handle.remove()
    return captured[0]


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per hidden unit over the tokens where ``mask`` is 1 (float32)."""
    weights = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    squared = (student.to(torch.float32) - teacher.to(torch.float32)).pow(2) * weights  # (B, T, H)
    return squared.sum() / (weights.sum() * student.shape[-1]).clamp_min(1.0)


@dataclass
class DistillResult:
    """Losses of a distillation run: the first and last step's MSE, and the number of steps."""

    first: float
    last: float
    steps: int


def distill_middle(
    student: nn.Module, teacher: nn.Module, plan: LayerPlan, batches: Sequence[Batch], lr: float, device: torch.device
) -> DistillResult:
    """One AdamW step per batch on the student's middle layers towards the teacher's middle output; everything else
    in both models stays as it was (``requires_grad``, train/eval mode). The optimizer steps float32 master copies
    of the weights, copied back after each step (a bfloat16 weight would round most steps of a small lr away)."""
    params = parameters_of_layers(student, plan.middle)
    masters = [p.detach().to(torch.float32).clone() for p in params]
    optimizer = torch.optim.AdamW(masters, lr=lr, weight_decay=0.0)
    n_top = len(plan.top)
    losses: list[float] = []
    with _only_trainable(student, params), _in_eval(student, teacher):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                target = middle_output(teacher, n_top, batch)
            loss = masked_mse(middle_output(student, n_top, batch), target, batch["attention_mask"])
            for p in params:
                p.grad = None
            loss.backward()
            for master, p in zip(masters, params):
                master.grad = p.grad.to(torch.float32) if p.grad is not None else None
            optimizer.step()
            with torch.no_grad():
                for master, p in zip(masters, params):
                    p.copy_(master)
            losses.append(float(loss.detach()))
    return DistillResult(losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"), len(losses))


def middle_gap(student: nn.Module, teacher: nn.Module, n_top: int, batches: Sequence[Batch], device: torch.device) -> float:
    """Mean of :func:`masked_mse` between the two middles over ``batches`` (no training)."""
    total = 0.0
    with torch.no_grad(), _in_eval(student, teacher):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            total += float(masked_mse(middle_output(student, n_top, batch), middle_output(teacher, n_top, batch), batch["attention_mask"]))
    return total / max(len(batches), 1)


@contextmanager
def _only_trainable(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """``params`` train and nothing else of ``model`` does (the adapter is frozen meanwhile); restored after."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for p in trainable:
            p.requires_grad_(True)


@contextmanager
def _in_eval(*models: nn.Module) -> Iterator[None]:
    """The models in eval mode (no dropout), their modes restored after."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
