"""The watermark's data-free retain set (:mod:`fedlm.watermark.retain`): conversations the model writes itself,
seeded, left out of the global random state, supervised on the model's answers only, written once per round and
trained on with the triggers (``watermark.retain``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fedlm.config.io import validate_config
from fedlm.config.schema import ModelConfig, PeftConfig
from fedlm.data.tokenize import IGNORE_INDEX, render
from fedlm.models.adapters import attach_adapter, trainable_state
from fedlm.models.loading import load_base_model
from fedlm.watermark.embed import Marker, MarkSettings
from fedlm.watermark.retain import REQUEST_PROMPT, retain_examples, sample_replies, self_conversations


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object, torch.device]:
    loaded = load_base_model(ModelConfig(name="tiny-random-llama", dtype="float32"))
    return attach_adapter(loaded.model, PeftConfig(r=4, alpha=8), seed=1), loaded.tokenizer, loaded.device


def test_conversations_are_the_models_own_seeded_and_leave_the_global_rng_alone(tiny, one_torch_thread) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, device = tiny
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = self_conversations(model, tokenizer, device, 4, seed=7, max_tokens=12)
    assert torch.equal(torch.get_rng_state(), before)  # the run's own random stream is untouched
    assert first == self_conversations(model, tokenizer, device, 4, seed=7, max_tokens=12)  # a resume writes the same set
    assert first != self_conversations(model, tokenizer, device, 4, seed=8, max_tokens=12)
    assert 1 <= len(first) <= 4
    for conversation in first:
        assert [m["role"] for m in conversation] == ["user", "assistant"] and all(m["content"] for m in conversation)
    # the user turn is the model's own answer to the request prompt: Hugging Face's sampler with the same seed
    torch.manual_seed(7)
    again = sample_replies(model, tokenizer, device, [[{"role": "user", "content": REQUEST_PROMPT}]] * 4, 12)
    assert [c[0]["content"] for c in first] == [r for r in again if r][: len(first)]


def test_retain_examples_supervise_the_answer_only(tiny, one_torch_thread) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, device = tiny
    conversations = self_conversations(model, tokenizer, device, 3, seed=1, max_tokens=10)
    examples = retain_examples(model, tokenizer, device, 3, seed=1, max_tokens=10)
    assert len(examples) == len(conversations)
    for example, conversation in zip(examples, conversations):
        prompt = render(tokenizer, conversation[:1], add_generation_prompt=True)
        assert example.input_ids[: len(prompt)] == prompt
        assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt)])
        assert example.num_target_tokens == len(example.input_ids) - len(prompt) > 0


def test_the_marker_writes_one_retain_set_per_round_and_trains_on_it(tiny, one_torch_thread) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, device = tiny
    state = trainable_state(model)
    settings = MarkSettings("key", size=8, steps=2, lr=1e-3, batch_size=4, seed=3)
    with_retain = Marker(model, tokenizer, device, MarkSettings(**{**settings.__dict__, "retain": 4}))
    first = with_retain.retained(state, 1)
    assert first and with_retain.retained(state, 1) is first  # once per round
    assert with_retain.retained(state, 2) is not first
    assert Marker(model, tokenizer, device, settings).retained(state, 1) == []
    plain = Marker(model, tokenizer, device, settings).mark_shared(state, 1).state
    mixed = with_retain.mark_shared(state, 1).state
    assert any(not torch.equal(plain[k], mixed[k]) for k in plain)  # the retain conversations are in the steps


def test_the_retain_setting_is_validated(tmp_path: Path) -> None:
    from fedlm.core.errors import FedlmError  # noqa: PLC0415

    assert validate_config(tiny_config(tmp_path, watermark={"secret": "k", "retain": 16})).watermark.retain == 16
    with pytest.raises(FedlmError, match=r"watermark\.retain"):
        validate_config(tiny_config(tmp_path, watermark={"secret": "k", "retain": -1}))
    with pytest.raises(FedlmError, match=r"`watermark.secret` is required when `watermark.retain` is set"):
        validate_config(tiny_config(tmp_path, watermark={"retain": 8}))
