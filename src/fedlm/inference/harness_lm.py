"""lm-evaluation-harness on a mixed model: the harness's own Hugging Face wrapper (``HFLM``) whose forward pass and
generation are those of a :class:`~fedlm.inference.mix.MixedModel` under one :class:`~fedlm.inference.mix.MixSpec`.

The harness scores a continuation by ``log_softmax`` of what ``_model_call`` returns; the mix's log-probabilities are
already normalised, so they pass through unchanged and every task (log-likelihood, multiple choice, generation) sees
the mixed model (p = w p_local + (1 - w) p_global for ``logits``, FedDPA's weighted adapters for ``adapter``). Its
batches are right-padded with no attention mask: a causal model's positions before the padding do not see it, so the
scores are exact; ``weight: auto`` pools each row's tokens as given (the padding included).
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from fedlm.inference.generate import eos_ids
from fedlm.inference.mix import MixedModel, MixSpec


class MixedHFLM(HFLM):
    """``HFLM`` around ``mixed.run.model`` whose logits and generations are the mix ``spec``'s."""

    def __init__(self, mixed: MixedModel, spec: MixSpec, batch_size: int = 8) -> None:
        mixed.check(spec)
        super().__init__(pretrained=mixed.run.model, tokenizer=mixed.run.tokenizer, batch_size=batch_size)
        self.mixed, self.spec = mixed, spec

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The mix's log-probabilities (B, T, V) for the harness's right-padded batch ``inps``."""
        return self.mixed.logprobs(self.spec, inps, torch.ones_like(inps))

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> torch.Tensor:
        """The mix's continuation of the left-padded ``context`` up to ``max_length`` tokens in all (greedy, or sampled
        when the task asks ``do_sample`` with a temperature), stopping at an end-of-sequence token or a ``stop`` string;
        returns context and continuation as the harness expects from ``generate``."""
        mask = generation_kwargs.get("attention_mask")
        mask = torch.ones_like(context) if mask is None else mask
        temperature = float(generation_kwargs.get("temperature") or 0.0)
        sample = bool(generation_kwargs.get("do_sample")) and temperature > 0
        tokenizer, eos = self.mixed.run.tokenizer, eos_ids(self.mixed)
        decoder = self.mixed.start(self.spec, context, mask)
        rows: list[list[int]] = [[] for _ in range(context.shape[0])]
        done = [False] * context.shape[0]
        logprobs = decoder.logprobs
        for _ in range(max(0, max_length - context.shape[1])):
            if sample:
                chosen = torch.multinomial(torch.softmax(logprobs / temperature, dim=-1), 1).squeeze(-1)
            else:
                chosen = logprobs.argmax(dim=-1)
            for i, token in enumerate(chosen.tolist()):
                if done[i]:
                    continue
                rows[i].append(token)
                text = tokenizer.decode(rows[i])
                done[i] = token in eos or any(s and s in text for s in stop)
            if all(done):
                break
            logprobs = decoder.step(chosen)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        width = max((len(r) for r in rows), default=0)
        out = torch.full((context.shape[0], width), pad, dtype=context.dtype, device=context.device)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=context.dtype)
        return torch.cat([context, out], dim=1)
