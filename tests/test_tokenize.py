"""The chat template is used and the loss covers response tokens only."""

from __future__ import annotations

from fedlm.data.collate import collate_for_loss, collate_prompts
from fedlm.data.formats import to_messages
from fedlm.data.tokenize import IGNORE_INDEX, tokenize_conversation, tokenize_prompt
from fedlm.models.tiny import build_byte_tokenizer

TOKENIZER = build_byte_tokenizer()


def _supervised_text(ids: list[int], labels: list[int]) -> str:
    return TOKENIZER.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_alpaca_loss_covers_only_the_answer() -> None:
    messages = to_messages({"instruction": "Define cat", "input": "", "output": "a small feline"}, "alpaca", None, "x")
    ex = tokenize_conversation(TOKENIZER, messages, max_length=512)
    assert _supervised_text(ex.input_ids, ex.labels) == "a small feline<|im_end|>\n"
    # The prompt part is exactly the generation prompt, all masked.
    prompt = tokenize_prompt(TOKENIZER, messages[:-1], 512)
    assert ex.input_ids[: len(prompt)] == prompt
    assert all(lab == IGNORE_INDEX for lab in ex.labels[: len(prompt)])
    assert ex.labels[len(prompt) :] == ex.input_ids[len(prompt) :]


def test_alpaca_input_joins_the_prompt_and_system_prompt_is_prepended() -> None:
    messages = to_messages({"instruction": "Translate", "input": "chat", "output": "cat"}, "alpaca", "Be brief.", "x")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == "Translate\n\nchat"


def test_every_assistant_turn_is_supervised_in_multi_turn_chat() -> None:
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "bye"},
    ]
    ex = tokenize_conversation(TOKENIZER, messages, max_length=512)
    assert _supervised_text(ex.input_ids, ex.labels) == "yo<|im_end|>\nbye<|im_end|>\n"
    assert len(ex.input_ids) == len(ex.labels)


def test_truncation_keeps_labels_aligned() -> None:
    messages = to_messages({"instruction": "q", "output": "x" * 100}, "alpaca", None, "x")
    ex = tokenize_conversation(TOKENIZER, messages, max_length=30)
    assert len(ex.input_ids) == len(ex.labels) == 30
    assert ex.num_target_tokens == 30 - len(tokenize_prompt(TOKENIZER, messages[:-1], 512))


def test_collate_pads_right_for_loss_and_left_for_generation() -> None:
    a = tokenize_conversation(TOKENIZER, to_messages({"instruction": "a", "output": "b"}, "alpaca", None, "x"), 64)
    b = tokenize_conversation(TOKENIZER, to_messages({"instruction": "aaaa", "output": "bbbb"}, "alpaca", None, "x"), 64)
    batch = collate_for_loss([a, b], pad_id=0)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * len(a.input_ids) + [0] * (len(b.input_ids) - len(a.input_ids))
    assert (batch["labels"][0, len(a.input_ids) :] == IGNORE_INDEX).all()
    prompts = collate_prompts([[5, 6], [7, 8, 9]], pad_id=0)
    assert prompts["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert prompts["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
