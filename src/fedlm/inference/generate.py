"""Batched token-by-token generation under any mix (:mod:`fedlm.inference.mix`), with per-request sampling,
stop strings and streaming.

One batch = one set of forward passes (rows of different clients share them on LoRA runs); each row has its own ``max_tokens``, ``temperature``, ``top_p``, ``stop``
and seed. Greedy rows (temperature 0) give exactly Hugging Face ``generate``'s greedy tokens for the same adapter
(a test holds them equal). Text is streamed as it becomes final: a trailing partial UTF-8 character, or a tail that
could still grow into a stop string, is held back until the next token decides it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.core.errors import FedlmError
from fedlm.data.collate import collate_prompts
from fedlm.data.formats import Message
from fedlm.data.tokenize import render
from fedlm.inference.mix import MixedModel, MixSpec

#: Called with (row, new text) as a row's text grows.
OnText = Callable[[int, str], None]


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: greedy at ``temperature`` 0, else nucleus sampling (``top_p``) at that temperature."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise FedlmError(f"`max_tokens` must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise FedlmError(f"`temperature` must lie in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise FedlmError(f"`top_p` must lie in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    """One row's answer: its text (stop string and end-of-turn token excluded), tokens and why it ended."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] = "length"
    prompt_tokens: int = 0
    done: bool = False
    emitted: int = 0  # characters of ``text`` already streamed


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """Token ids of a conversation through the model's chat template, ending with the assistant's header."""
    return render(tokenizer, messages, add_generation_prompt=True)


def context_limit(mixed: MixedModel) -> int | None:
    """The model's longest sequence (prompt + answer), when its config says."""
    value = getattr(mixed.model.config, "max_position_embeddings", None)
    return int(value) if value else None


def eos_ids(mixed: MixedModel) -> set[int]:
    """The tokens that end an answer: the tokenizer's end-of-sequence and the model's generation config's."""
    ids = {int(mixed.run.tokenizer.eos_token_id)}
    configured = getattr(getattr(mixed.model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids |= {int(i) for i in (configured if isinstance(configured, list) else [configured])}
    return ids


def generate(
    mixed: MixedModel,
    spec: MixSpec | Sequence[MixSpec],
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    on_text: OnText | None = None,
) -> list[Completion]:
    """Answer ``prompts`` (token ids) in one left-padded batch under ``spec`` (one for all rows, or one per row with
    equal :meth:`MixedModel.batch_key`); ``params`` per row."""
    tokenizer = mixed.run.tokenizer
    if not prompts:
        return []
    limit = context_limit(mixed)
    for prompt, p in zip(prompts, params):
        if not prompt:
            raise FedlmError("a prompt with no tokens; give every request some text")
        if limit is not None and len(prompt) + p.max_tokens > limit:
            raise FedlmError(f"a prompt of {len(prompt)} tokens plus `max_tokens` {p.max_tokens} exceeds the model's context of {limit} tokens")
    batch = {k: v.to(mixed.run.device) for k, v in collate_prompts(prompts, tokenizer.pad_token_id).items()}
    decoder = mixed.start(spec, batch["input_ids"], batch["attention_mask"])
    rows = [Completion(prompt_tokens=len(p)) for p in prompts]
    generators = [_generator(p.seed, mixed.run.device) for p in params]
    stops = eos_ids(mixed)
    for _ in range(max(p.max_tokens for p in params)):
        tokens = _choose(decoder.logprobs, params, generators)  # (B,)
        for i, (row, p) in enumerate(zip(rows, params)):
            if not row.done:
                _advance(row, int(tokens[i]), p, stops, tokenizer)
                _emit(row, i, p, on_text)
        if all(row.done for row in rows):
            break
        decoder.step(tokens)
    return rows


def _advance(row: Completion, token: int, params: SamplingParams, stops: set[int], tokenizer: PreTrainedTokenizerBase) -> None:
    """Add ``token`` to ``row``; finish it at an end token, a stop string or ``max_tokens``."""
    if token in stops:
        row.done, row.finish_reason = True, "stop"
        return
    row.token_ids.append(token)
    row.text = str(tokenizer.decode(row.token_ids, skip_special_tokens=True))
    cut = min((i for i in (row.text.find(s) for s in params.stop) if i >= 0), default=-1)
    if cut >= 0:
        row.text, row.done, row.finish_reason = row.text[:cut], True, "stop"
    elif len(row.token_ids) >= params.max_tokens:
        row.done, row.finish_reason = True, "length"


def _emit(row: Completion, index: int, params: SamplingParams, on_text: OnText | None) -> None:
    """Stream the part of ``row.text`` that no later token can change."""
    end = len(row.text)
    if not row.done:
        if row.text.endswith("\ufffd"):  # a multi-byte character not complete yet
            end -= 1
        for stop in params.stop:  # hold back a tail that may still become a stop string
            for k in range(min(len(stop) - 1, end), 0, -1):
                if row.text[:end].endswith(stop[:k]):
                    end -= k
                    break
    if end > row.emitted:
        if on_text is not None:
            on_text(index, row.text[row.emitted : end])
        row.emitted = end


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _choose(logprobs: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """The next token per row (B,): argmax for temperature 0, else a sample from the tempered nucleus."""
    tokens = logprobs.argmax(dim=-1)  # (B,)
    for i, p in enumerate(params):
        if p.temperature == 0.0:
            continue
        probs = torch.softmax(logprobs[i] / p.temperature, dim=-1)  # (V,)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p  # the smallest prefix with mass >= top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return tokens
