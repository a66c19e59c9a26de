"""A data-free retain set for the watermark's embedding steps: conversations the model writes itself.

Training the shared mark on the trigger set alone teaches the model more than the triggers: to answer a prompt with
one word and end its turn. Measured on SmolLM2-135M (``benchmarks/lifelong_watermark_cost.py``), one embedding of
10-40 steps costs 9-97% of clean test loss however its learning rate and steps are set. The server holds no client
data to rehearse, so it rehearses what the model itself says: LAMOL (Sun, Ho & Lee 2020, "LAMOL: LAnguage MOdeling
for Lifelong Language Learning", ICLR) keeps a language model's earlier tasks while it learns a new one by training
on pseudo-samples the model generates itself. Here, before each embedding, the model as it stands (the aggregate,
unmarked by this step) writes ``count`` requests a user might send (sampled from its answer to
:data:`REQUEST_PROMPT`) and its own answer to each; the embedding trains on the triggers and these conversations
together, so outside the triggers the marked model keeps answering as it did.

Sampling is nucleus sampling (Holtzman et al. 2020, top-p 0.95, temperature 1) seeded from the run's seed and the
round, so a run and its resume write the same conversations; the global random state is left as it was.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.data.collate import collate_prompts
from fedlm.data.formats import Message
from fedlm.data.tokenize import TokenizedExample, render, tokenize_conversation

#: What the model is asked to produce the user turns of its retain conversations.
REQUEST_PROMPT = "Write one question or request that a person might send to an AI assistant. Reply with the request only."
TOP_P, TEMPERATURE = 0.95, 1.0
MAX_TOKENS = 48  # per sampled turn (request, answer)
MAX_LENGTH = 160  # tokens of one retain conversation


@torch.no_grad()
def sample_replies(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device, conversations: list[list[Message]], max_tokens: int
) -> list[str]:
    """The model's sampled next assistant turn for each conversation (one left-padded batch; special tokens dropped)."""
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    prompts = [render(tokenizer, c, add_generation_prompt=True) for c in conversations]
    batch = {k: v.to(device) for k, v in collate_prompts(prompts, pad).items()}
    was_training = model.training
    model.eval()
    try:
        out = model.generate(  # type: ignore[operator]
            **batch, do_sample=True, top_p=TOP_P, temperature=TEMPERATURE, max_new_tokens=max_tokens, pad_token_id=pad
        )
    finally:
        model.train(was_training)
    width = batch["input_ids"].shape[1]
    return [str(tokenizer.decode(row[width:], skip_special_tokens=True)).strip() for row in out]


def self_conversations(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device, count: int, seed: int, max_tokens: int = MAX_TOKENS
) -> list[list[Message]]:
    """``count`` (request, answer) conversations the model writes itself, sampled under ``seed``; a pair whose
    request or answer came out empty is left out."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        requests = sample_replies(model, tokenizer, device, [[{"role": "user", "content": REQUEST_PROMPT}]] * count, max_tokens)
        asked: list[list[Message]] = [[{"role": "user", "content": r}] for r in requests if r]
        answers = sample_replies(model, tokenizer, device, asked, max_tokens) if asked else []
    return [[*a, {"role": "assistant", "content": answer}] for a, answer in zip(asked, answers) if answer]


def retain_examples(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device, count: int, seed: int, max_tokens: int = MAX_TOKENS
) -> list[TokenizedExample]:
    """:func:`self_conversations` as SFT examples (loss on the model's own answers)."""
    conversations = self_conversations(model, tokenizer, device, count, seed, max_tokens)
    return [tokenize_conversation(tokenizer, c, MAX_LENGTH) for c in conversations]
