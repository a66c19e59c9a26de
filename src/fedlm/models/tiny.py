"""A tiny random Llama and a byte-level chat tokenizer, built in code, for tests and smoke runs (seconds)."""

from __future__ import annotations

import re

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedlm.core.seeding import seeded_torch

TINY_ALIAS = "tiny-random-llama"
#: ``tiny-random-llama-<N>l``: the same tiny model with N decoder layers (2-32), e.g. for offsite-tuning's emulator,
#: which needs layers between its bottom and top adapters.
_DEEP_TINY = re.compile(r"^tiny-random-llama-(\d+)l$")
TINY_LAYERS = 2
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, the format of SmolLM2's own template (no default system prompt).
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + ChatML specials) with a chat template; no training, no files."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = _CHATML_TEMPLATE
    return tokenizer


def tiny_num_layers(name: str) -> int | None:
    """The decoder layers of the tiny model called ``name`` (``tiny-random-llama``: 2; ``tiny-random-llama-8l``: 8), or
    None when ``name`` is not a tiny alias."""
    if name == TINY_ALIAS:
        return TINY_LAYERS
    match = _DEEP_TINY.match(name)
    return int(match.group(1)) if match and 2 <= int(match.group(1)) <= 32 else None


def build_tiny_llama(
    vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", num_layers: int = TINY_LAYERS
) -> LlamaForCausalLM:
    """A Llama with hidden size 64 and ``num_layers`` layers (2: ~150K parameters), initialised from ``seed`` without
    touching global RNG.

    Initialised in float32 and its parameters rounded to ``dtype``; the rotary frequencies stay float32, as in a model
    that ``from_pretrained(..., dtype=dtype)`` loads, so the tiny model reloaded from a saved folder computes the same.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation=attn_implementation,  # type: ignore[call-arg]  # PreTrainedConfig takes it through **kwargs
    )
    with seeded_torch(seed):
        model = LlamaForCausalLM(config)
    for param in model.parameters():  # not model.to(dtype): like from_pretrained, keep the rotary buffers in float32
        param.data = param.data.to(dtype)
    return model
