"""The retain set as distillation (``watermark.retain_loss: kl``, :mod:`fedlm.watermark.distill`): zero loss and zero
gradient at the reference, the top-k KL and the cross-entropy by hand, and the marker distilling the state it marks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fedlm.config.io import validate_config
from fedlm.config.schema import ModelConfig, PeftConfig
from fedlm.core.errors import FedlmError
from fedlm.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_conversation
from fedlm.models.adapters import attach_adapter, load_trainable_state, trainable_state
from fedlm.models.loading import load_base_model
from fedlm.watermark.distill import DistilledExample, MarkObjective, distilled
from fedlm.watermark.embed import Marker, MarkSettings
from fedlm.watermark.triggers import SHARED, conversation, trigger_set


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object, torch.device, dict[str, torch.Tensor]]:
    """The model, tokenizer, device and its clean adapter state."""
    loaded = load_base_model(ModelConfig(name="tiny-random-llama", dtype="float32"))
    model = attach_adapter(loaded.model, PeftConfig(r=4, alpha=8, dropout=0.0), seed=1)
    return model, loaded.tokenizer, loaded.device, trainable_state(model)


def chats(tokenizer, n: int) -> list[TokenizedExample]:  # type: ignore[no-untyped-def]
    """``n`` short conversations with a supervised answer of a few words."""
    return [tokenize_conversation(tokenizer, conversation(t.prompt, f"{t.answer} and the {t.answer}"), 96) for t in trigger_set("k", SHARED, n)]


def moved(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """``state`` with every tensor shifted by a seeded perturbation."""
    generator = torch.Generator().manual_seed(0)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in state.items()}


def test_the_loss_and_its_gradient_are_zero_at_the_reference(tiny, one_torch_thread) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, device, clean = tiny
    load_trainable_state(model, moved(clean, 0.05))  # a non-trivial reference
    examples = distilled(model, chats(tokenizer, 3), 0, device, k=8)
    objective = MarkObjective()
    model.zero_grad()
    loss, metrics = objective.loss(model, objective.collate(examples, 0))
    loss.backward()
    assert abs(float(loss)) < 1e-6 and metrics["retain_kl"] < 1e-6 and "ce_loss" not in metrics
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) < 1e-5


def test_kl_and_cross_entropy_by_hand(tiny, one_torch_thread) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, device, clean = tiny
    load_trainable_state(model, clean)
    plain, to_distil = chats(tokenizer, 2)
    reference = distilled(model, [to_distil], 0, device, k=5)[0]
    load_trainable_state(model, moved(clean, 0.2))
    objective = MarkObjective()
    with torch.no_grad():
        loss, metrics = objective.loss(model, objective.collate([plain, reference], 0))
    terms = []
    for example in (plain, reference):  # one at a time, in float64
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
        labels = example.labels[1:]
        positions = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
        for i, t in enumerate(positions):
            if isinstance(example, DistilledExample):
                ref = torch.log_softmax(example.top_logp[i].double(), dim=-1)
                cur = torch.log_softmax(logp[t, example.top_ids[i]], dim=-1)
                terms.append(float((ref.exp() * (ref - cur)).sum()))
            else:
                terms.append(-float(logp[t, labels[t]]))
    assert float(loss) == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    assert metrics["retain_kl"] > 0 and metrics["ce_loss"] > 0


def test_the_marker_distils_the_state_it_marks(tiny, one_torch_thread) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, device, clean = tiny
    settings = MarkSettings("key", size=4, steps=2, lr=1e-3, batch_size=4, seed=3, retain=3, retain_loss="kl")
    marker = Marker(model, tokenizer, device, settings)
    state = moved(clean, 0.05)
    retain = marker.retain_for(state, 1)
    assert retain and all(isinstance(ex, DistilledExample) for ex in retain)
    load_trainable_state(model, state)
    again = distilled(model, marker.retained(state, 1), marker.pad_id, device)
    assert all(torch.equal(a.top_ids, b.top_ids) for a, b in zip(retain, again))  # the reference is `state` itself
    mark = marker.mark_shared(state, 1)
    assert mark.steps == 2 and any(not torch.equal(mark.state[k], state[k]) for k in state)


def test_retain_loss_is_validated(tmp_path: Path) -> None:
    config = validate_config(tiny_config(tmp_path, watermark={"secret": "k", "retain": 8, "retain_loss": "kl"})).watermark
    assert config.retain_loss == "kl"
    with pytest.raises(FedlmError, match=r"watermark\.retain_loss"):
        validate_config(tiny_config(tmp_path, watermark={"secret": "k", "retain_loss": "mse"}))
