"""Client-side parts of algorithms (FedProx, SCAFFOLD) and per-client ranks, against plain PyTorch loops and
hand-computed values."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedlm.aggregation.base import build_aggregator
from fedlm.aggregation.fedprox import ProximalHook, proximal_term
from fedlm.aggregation.lora_structure import truncate_to_rank
from fedlm.aggregation.scaffold import ScaffoldHook, client_control_update, scaffold_server_step
from fedlm.config import PeftConfig
from fedlm.core.sampling import batch_indices
from fedlm.core.task import ClientContext, LocalPlan
from fedlm.core.update import ClientUpdate
from fedlm.data.collate import collate_for_loss
from fedlm.data.formats import to_messages
from fedlm.data.readers import read_records
from fedlm.data.tokenize import tokenize_conversation
from fedlm.federation.trainer import ClientTrainer
from fedlm.models.adapters import attach_adapter, trainable_state
from fedlm.models.tiny import build_byte_tokenizer, build_tiny_llama

LRS, BATCH, SEED = [0.05, 0.04, 0.03], 4, 7


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_byte_tokenizer()
    records = read_records("embedded:wordnet_defs")[:16]
    examples = [tokenize_conversation(tokenizer, to_messages(r, "alpaca", None, "x"), 96) for r in records]
    return tokenizer, examples


def _trainer(tokenizer, hooks, optimizer: str = "sgd") -> tuple[ClientTrainer, dict[str, torch.Tensor]]:
    model = attach_adapter(build_tiny_llama(len(tokenizer), seed=1), PeftConfig(r=4, alpha=8, dropout=0.0), seed=5)
    start = trainable_state(model)
    start = {n: t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, (n, t) in enumerate(sorted(start.items()))}
    return ClientTrainer(model, tokenizer.pad_token_id, torch.device("cpu"), 0.0, None, hooks, optimizer), start


def _plain_sgd(tokenizer, examples, start, grad_fn) -> dict[str, torch.Tensor]:
    """Reference: peft + torch SGD + hand-written loss; ``grad_fn(name, param, grad)`` may change the gradient."""
    ref = get_peft_model(
        build_tiny_llama(len(tokenizer), seed=1),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    named = {n.replace(".default", ""): p for n, p in ref.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(start[name])
    for lr, ids in zip(LRS, batch_indices(len(examples), len(LRS), BATCH, SEED)):
        b = collate_for_loss([examples[i] for i in ids], tokenizer.pad_token_id)
        logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1), ignore_index=-100)
        ref.zero_grad()
        loss_total = loss + grad_fn("loss", named, None)
        loss_total.backward()
        with torch.no_grad():
            for name, p in named.items():
                p -= lr * grad_fn(name, p, p.grad)
    return {n: p.detach().clone() for n, p in named.items()}


def test_proximal_term_closed_form() -> None:
    w = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([3.0])}
    anchor = {"x": torch.tensor([0.0, 0.0]), "y": torch.tensor([1.0])}
    assert float(proximal_term(w, anchor, mu=0.5)) == pytest.approx(0.25 * (1 + 4 + 4))


def test_fedprox_client_matches_a_plain_loop_with_the_proximal_term(setup) -> None:
    tokenizer, examples = setup
    mu = 0.7
    trainer, start = _trainer(tokenizer, [ProximalHook(mu)])
    update = trainer.train("c", examples, start, LocalPlan(1, LRS, BATCH, SEED))

    def prox(name, named, grad):
        if name == "loss":
            return (mu / 2) * sum(((p - start[n]) ** 2).sum() for n, p in named.items())
        return grad

    ref = _plain_sgd(tokenizer, examples, start, prox)
    for name, delta in update.tensors.items():
        torch.testing.assert_close(start[name] + delta, ref[name], rtol=1e-5, atol=1e-6)
    plain, _ = _trainer(tokenizer, [])
    no_prox = plain.train("c", examples, start, LocalPlan(1, LRS, BATCH, SEED))
    assert any(not torch.allclose(update.tensors[n], no_prox.tensors[n]) for n in update.tensors)


def test_scaffold_client_matches_a_plain_loop_with_corrected_gradients(setup) -> None:
    tokenizer, examples = setup
    trainer, start = _trainer(tokenizer, [ScaffoldHook("II")])
    g = torch.Generator().manual_seed(11)
    c = {n: 0.1 * torch.randn(t.shape, generator=g) for n, t in start.items()}
    c_i = {n: 0.1 * torch.randn(t.shape, generator=g) for n, t in start.items()}
    context = ClientContext("c", 1, {f"c.{n}": t for n, t in c.items()}, {f"c_i.{n}": t for n, t in c_i.items()})
    update = trainer.train("c", examples, start, LocalPlan(1, LRS, BATCH, SEED), context=context)

    ref = _plain_sgd(tokenizer, examples, start, lambda n, p, grad: torch.zeros(()) if n == "loss" else grad + c[n] - c_i[n])
    for name, delta in update.tensors.items():
        torch.testing.assert_close(start[name] + delta, ref[name], rtol=1e-5, atol=1e-6)
    # option II: c_i+ = c_i - c + (x - y) / (K eta_l); uploaded Delta c_i = c_i+ - c_i
    for name in start:
        expected = c_i[name] - c[name] + (start[name] - ref[name]) / sum(LRS)
        torch.testing.assert_close(update.memory[f"c_i.{name}"], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(update.extras[f"delta_c.{name}"], expected - c_i[name], rtol=1e-4, atol=1e-5)


def test_scaffold_option_one_uses_the_mean_gradient_at_the_server_model(setup) -> None:
    tokenizer, examples = setup
    trainer, start = _trainer(tokenizer, [ScaffoldHook("I")])
    update = trainer.train("c", examples, start, LocalPlan(1, LRS, BATCH, SEED))
    grads = {}

    def record(name, p, grad):
        if name != "loss" and name not in grads:
            grads[name] = []
        if name != "loss":
            grads[name].append(grad.clone())
        return torch.zeros(()) if name == "loss" else torch.zeros_like(grad)  # no step: gradients at x

    _plain_sgd(tokenizer, examples, start, record)
    for name in start:
        mean = sum(grads[name]) / len(grads[name])
        torch.testing.assert_close(update.memory[f"c_i.{name}"], mean, rtol=1e-4, atol=1e-6)


def test_scaffold_math_hand_computed() -> None:
    x = {"w": torch.tensor([1.0, 1.0])}
    y = {"w": torch.tensor([0.0, 2.0])}
    c, c_i = {"w": torch.tensor([0.5, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    # c_i - c + (x - y) / (K eta) with K eta = 0.5: (0 - 0.5 + 2, 1 - 0 - 2) = (1.5, -1)
    assert torch.allclose(client_control_update(c_i, c, x, y, 0.5, "II")["w"], torch.tensor([1.5, -1.0]))
    new_x, new_c = scaffold_server_step(
        x,
        [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}],
        [1, 3],
        [{"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([0.0, -4.0])}],
        c,
        server_lr=0.5,
        num_clients=4,
    )
    # x + 0.5 * (0.25 * (1, 0) + 0.75 * (0, 4)) = (1.125, 2.5); c + (1/4) * ((2, 2) + (0, -4)) = (1.0, -0.5)
    assert torch.allclose(new_x["w"], torch.tensor([1.125, 2.5]))
    assert torch.allclose(new_c["w"], torch.tensor([1.0, -0.5]))


def test_scaffold_keeps_each_clients_control_variate_across_rounds() -> None:
    agg = build_aggregator("scaffold", {})
    agg.start(["a", "b", "c"])
    params = {"w": torch.zeros(2)}
    update = ClientUpdate("a", 1, 5, {"w": torch.ones(2)}, extras={"delta_c.w": torch.tensor([3.0, 0.0])}, memory={"c_i.w": torch.tensor([3.0, 0.0])})
    agg.aggregate(params, [update])
    ctx_a, ctx_b = agg.client_context("a", 2), agg.client_context("b", 2)
    assert torch.equal(ctx_a.memory["c_i.w"], torch.tensor([3.0, 0.0])) and not ctx_b.memory
    assert torch.allclose(ctx_a.extras["c.w"], torch.tensor([1.0, 0.0]))  # c = (1/N) sum Delta c_i
    restored = build_aggregator("scaffold", {})
    restored.load_state_dict(agg.state_dict())
    assert torch.equal(restored.client_context("a", 2).memory["c_i.w"], ctx_a.memory["c_i.w"])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_client_of_smaller_rank_trains_only_its_first_components(setup, optimizer: str) -> None:
    tokenizer, examples = setup
    trainer, start = _trainer(tokenizer, [ScaffoldHook("I")], optimizer)
    cut = truncate_to_rank(start, 2)
    update = trainer.train("c", examples, cut, LocalPlan(1, LRS, BATCH, SEED, rank=2), context=ClientContext("c", 1, rank=2))
    for name, delta in update.tensors.items():
        if name.endswith("lora_A.weight"):
            assert torch.equal(delta[2:], torch.zeros_like(delta[2:])) and delta[:2].abs().max() > 0
        elif name.endswith("lora_B.weight"):
            assert torch.equal(delta[:, 2:], torch.zeros_like(delta[:, 2:])) and delta[:, :2].abs().max() > 0
    for name, c_i in update.memory.items():
        if name.endswith("lora_A.weight"):
            assert torch.equal(c_i[2:], torch.zeros_like(c_i[2:]))


def test_rank_mask_holds_where_gradients_would_not_vanish_on_their_own(setup) -> None:
    """FFA (A frozen and nonzero) and a SCAFFOLD correction both push padded components; the mask keeps them 0."""
    tokenizer, examples = setup
    model = attach_adapter(build_tiny_llama(len(tokenizer), seed=1), PeftConfig(r=4, alpha=8, dropout=0.0), seed=5, freeze_lora_a=True)
    start = truncate_to_rank(trainable_state(model), 2)
    assert start and all(name.endswith("lora_B.weight") for name in start)
    correction = {f"c.{n}": torch.ones_like(t) for n, t in start.items()}  # c - c_i = 1 everywhere
    trainer = ClientTrainer(model, tokenizer.pad_token_id, torch.device("cpu"), 0.0, None, [ScaffoldHook("I")], "sgd")
    update = trainer.train("c", examples, start, LocalPlan(1, LRS, BATCH, SEED, rank=2), context=ClientContext("c", 1, correction, rank=2))
    for delta in update.tensors.values():
        assert torch.equal(delta[:, 2:], torch.zeros_like(delta[:, 2:])) and delta[:, :2].abs().max() > 0


def test_rank_mask_keeps_padded_rows_of_a_at_zero_under_a_correction(setup) -> None:
    tokenizer, examples = setup
    trainer, start = _trainer(tokenizer, [ScaffoldHook("I")])
    start = truncate_to_rank(start, 2)
    correction = {f"c.{n}": torch.ones_like(t) for n, t in start.items()}
    update = trainer.train("c", examples, start, LocalPlan(1, LRS, BATCH, SEED, rank=2), context=ClientContext("c", 1, correction, rank=2))
    for name, delta in update.tensors.items():
        if name.endswith("lora_A.weight"):
            assert torch.equal(delta[2:], torch.zeros_like(delta[2:]))
