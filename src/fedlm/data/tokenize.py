"""Conversations to token ids through the tokenizer's own chat template, with the loss on responses only.

Every assistant turn is supervised; system and user turns and the template's role headers are masked with
``IGNORE_INDEX``. Masks are found by rendering growing prefixes of the conversation: the tokens that the
``i``-th assistant message adds after ``apply_chat_template(messages[:i], add_generation_prompt=True)`` are its
response tokens (the content and the template's end-of-turn token).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fedlm.core.errors import FedlmError
from fedlm.data.formats import Message

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels (``IGNORE_INDEX`` outside responses) of one conversation."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_target_tokens(self) -> int:
        """How many tokens the loss covers."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` through the chat template (no extra special tokens added)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_length: int) -> TokenizedExample:
    """Ids and response-only labels for a conversation, cut from the right at ``max_length`` tokens."""
    input_ids: list[int] = []
    labels: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_ids = render(tokenizer, messages[:index], add_generation_prompt=True)
        full_ids = render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if full_ids[: len(prompt_ids)] != prompt_ids or prompt_ids[: len(input_ids)] != input_ids:
            raise FedlmError(
                "the tokenizer's chat template does not render conversations prefix-consistently, so response "
                "tokens cannot be located; use a model with a ChatML-like template"
            )
        labels += [IGNORE_INDEX] * (len(prompt_ids) - len(input_ids)) + full_ids[len(prompt_ids) :]
        input_ids = full_ids
    return TokenizedExample(input_ids=input_ids[:max_length], labels=labels[:max_length])


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: list[Message], max_length: int) -> list[int]:
    """Ids of a generation prompt (ending with the assistant header), keeping its last ``max_length`` tokens."""
    return render(tokenizer, prompt, add_generation_prompt=True)[-max_length:]
