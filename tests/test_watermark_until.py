"""The watermark's stopping rule (``watermark.until``, WAFFLE's re-training until the watermark accuracy reaches a
threshold): an embedding stops at the first check where its trigger set is answered that well, a state that already
carries the mark costs no step, the accuracy it reports is the one ``verify`` gives; the verifier's scores equal a
plain full-softmax computation; and WAFFLE's pre-training of the initial model (``watermark.start_steps``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fedlm.config.io import validate_config
from fedlm.config.schema import ModelConfig, PeftConfig
from fedlm.core.errors import FedlmError
from fedlm.data.collate import collate_for_loss
from fedlm.federation.aggregation_step import AggregateOutcome
from fedlm.models.adapters import attach_adapter, load_trainable_state, trainable_state
from fedlm.models.loading import load_base_model
from fedlm.watermark.embed import Marker, MarkSettings
from fedlm.watermark.rounds import StartMark, WatermarkedAggregation
from fedlm.watermark.triggers import SHARED, candidate_examples, trigger_set
from fedlm.watermark.verify import sequence_log_likelihoods, verify_model

SETTINGS = MarkSettings("key", size=8, steps=60, lr=0.01, batch_size=4, seed=3, until=0.5, check_every=5)


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object, torch.device, dict[str, torch.Tensor]]:
    """The model, tokenizer, device and the clean adapter state (a marker leaves the model holding its mark)."""
    loaded = load_base_model(ModelConfig(name="tiny-random-llama", dtype="float32"))
    # LoRA on lm_head too: the tiny random model's own head is too flat to learn triggers fast
    peft = PeftConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    model = attach_adapter(loaded.model, peft, seed=1)
    return model, loaded.tokenizer, loaded.device, trainable_state(model)


def test_the_embedding_stops_once_the_triggers_are_answered_and_a_marked_state_costs_no_step(tiny, one_torch_thread) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, device, clean = tiny
    marker = Marker(model, tokenizer, device, SETTINGS)
    first = marker.mark_shared(clean, 1)
    assert first.accuracy is not None and first.accuracy >= 0.5
    assert 0 < first.steps < SETTINGS.steps and first.steps % SETTINGS.check_every == 0 and first.loss is not None
    load_trainable_state(model, first.state)
    assert verify_model(model, tokenizer, device, "key", 8).accuracy == first.accuracy  # the accuracy verify reports

    shorter = Marker(model, tokenizer, device, MarkSettings(**{**SETTINGS.__dict__, "steps": first.steps - SETTINGS.check_every}))
    assert shorter.mark_shared(clean, 1).accuracy < 0.5  # type: ignore[operator]  # it did stop at the first check that passed

    again = marker.mark_shared(first.state, 2)
    assert again.steps == 0 and again.loss is None and again.accuracy == first.accuracy
    assert all(torch.equal(again.state[k], first.state[k]) for k in first.state)


def test_without_until_the_embedding_takes_every_step(tiny, one_torch_thread) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, device, clean = tiny
    mark = Marker(model, tokenizer, device, MarkSettings(**{**SETTINGS.__dict__, "until": None, "steps": 3})).mark_shared(clean, 1)
    assert mark.steps == 3 and mark.accuracy is None and mark.loss is not None


def test_a_client_copy_stops_on_its_own_trigger_set(tiny, one_torch_thread) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, device, clean = tiny
    settings = MarkSettings(**{**SETTINGS.__dict__, "client_size": 6, "client_steps": 60, "lr": 0.03})
    copy = Marker(model, tokenizer, device, settings).mark_client(clean, "c1", 1)
    assert copy.accuracy is not None and copy.accuracy >= 0.5 and copy.steps < 60


def test_scores_equal_a_full_softmax_by_hand(tiny, one_torch_thread) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, device, clean = tiny
    load_trainable_state(model, clean)
    examples = [ex for t in trigger_set("key", SHARED, 3) for ex in candidate_examples(tokenizer, t)]
    fast = sequence_log_likelihoods(model, examples, 0, device, batch_size=7)
    expected = []
    for example in examples:  # one at a time, every position's softmax, the labelled ones summed
        batch = collate_for_loss([example], 0)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, :-1].double()
        labels = batch["labels"][0, 1:]
        logp = torch.log_softmax(logits, dim=-1)
        expected.append(sum(float(logp[t, int(labels[t])]) for t in range(len(labels)) if labels[t] != -100))
    assert torch.allclose(fast.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)


def test_until_is_validated(tmp_path: Path) -> None:
    config = validate_config(tiny_config(tmp_path, watermark={"secret": "k", "until": 0.9, "check_every": 2})).watermark
    assert (config.until, config.check_every) == (0.9, 2)
    for bad in ({"until": 0}, {"until": 1.5}, {"check_every": 0}):
        with pytest.raises(FedlmError, match=rf"watermark\.{next(iter(bad))}"):
            validate_config(tiny_config(tmp_path, watermark={"secret": "k", **bad}))
    with pytest.raises(FedlmError, match=r"`watermark.secret` is required when `watermark.until` is set"):
        validate_config(tiny_config(tmp_path, watermark={"until": 0.9}))


class RecordingAggregation:
    """An aggregation step that keeps the state it was given and returns it unchanged."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def aggregate(self, state, tasks, accepted, round_num):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
        self.seen.append(state)
        return AggregateOutcome(state, skipped=False)


def test_the_start_mark_is_trained_once_and_round_one_aggregates_around_it(tiny, one_torch_thread) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, device, clean = tiny
    marker = Marker(model, tokenizer, device, MarkSettings(**{**SETTINGS.__dict__, "steps": 5}))
    start = StartMark(marker, steps=60)
    marked = start.apply(clean, 1)
    assert start.apply(clean, 1) is marked and start.apply(clean, 2) is clean
    assert start.metrics(1)["watermark_start_accuracy"] >= 0.5 and start.metrics(2) == {}
    inner = RecordingAggregation()
    outcome = WatermarkedAggregation(inner, marker, start).aggregate(clean, {}, [], 1)  # type: ignore[arg-type]
    assert inner.seen[0] is marked  # round 1's aggregate is built on the marked start, not the unmarked state
    assert outcome.metrics["watermark_steps"] == 0 and outcome.metrics["watermark_start_steps"] == start.metrics(1)["watermark_start_steps"]
    WatermarkedAggregation(inner, marker, start).aggregate(clean, {}, [], 2)
    assert inner.seen[1] is clean
