"""objective: dpo: the loss against hand-computed values, the adapter-disabled reference, tokenisation, bad input."""

from __future__ import annotations

import copy
import math
import typing

import pytest
import torch

from fedlm.config import DataConfig, EvalConfig, PartitionConfig, PeftConfig
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.core.task import LocalPlan
from fedlm.data.prepare import prepare_federated_data
from fedlm.data.readers import read_records
from fedlm.data.tokenize import IGNORE_INDEX
from fedlm.federation.trainer import ClientTrainer
from fedlm.models.adapters import attach_adapter, trainable_state
from fedlm.models.tiny import build_byte_tokenizer, build_tiny_llama
from fedlm.objectives import build_objective
from fedlm.objectives.base import sequence_logps
from fedlm.objectives.dpo import dpo_loss, reference_logps, reward_metrics

DATA = DataConfig(max_length=128)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # faster than two threads on a small shared machine


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def _pairs(tokenizer, n: int = 4):
    records = read_records("embedded:wordnet_prefs")[:n]
    return build_objective("dpo").train_examples(records, tokenizer, DATA, "c", ["x"] * n)


def test_dpo_loss_matches_hand_computed_values() -> None:
    # pair 1: r_c = 0.1 * (-10 - -11) = 0.1, r_r = 0.1 * (-12 - -11.5) = -0.05, margin 0.15,
    #         loss = -log sigmoid(0.15) = log(1 + e^-0.15) = log(1.8607080) = 0.6209569
    # pair 2: r_c = 0.1 * (-8 - -8.5) = 0.05, r_r = 0.1 * (-7 - -7.5) = 0.05, margin 0, loss = log 2 = 0.6931472
    # pair 3: r_c = 0.5 * (-4 - -2) = -1.0, r_r = 0.5 * (-3 - -4) = 0.5 (beta 0.5 below), margin -1.5, loss = log(1 + e^1.5) = 1.7014132
    pc, pr = torch.tensor([-10.0, -8.0]), torch.tensor([-12.0, -7.0])
    rc, rr = torch.tensor([-11.0, -8.5]), torch.tensor([-11.5, -7.5])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.6209569, 0.6931472]))
    torch.testing.assert_close(chosen, torch.tensor([0.1, 0.05]))
    torch.testing.assert_close(rejected, torch.tensor([-0.05, 0.05]))
    metrics = reward_metrics(chosen, rejected)
    assert metrics["preference_accuracy"] == 0.5  # a zero margin is not a preference
    assert metrics["reward_margin"] == pytest.approx(0.075)
    losses, _, _ = dpo_loss(torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-4.0]), beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([1.7014132]))


def test_reference_is_the_base_model_with_the_adapter_disabled(tokenizer) -> None:
    base = build_tiny_llama(len(tokenizer), seed=7)
    pristine = copy.deepcopy(base)  # the base model before any adapter is attached
    model = attach_adapter(base, PeftConfig(r=4, alpha=8, dropout=0.0), seed=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))  # a non-zero adapter
    model.eval()
    objective = build_objective("dpo")
    batch = objective.collate(_pairs(tokenizer), tokenizer.pad_token_id)
    ref = reference_logps(model, batch)
    torch.testing.assert_close(ref, sequence_logps(pristine, batch)[0])
    policy = sequence_logps(model, batch)[0]
    assert (policy - ref).abs().min() > 1e-3  # the adapter changes every sequence's log-probability
    assert not ref.requires_grad and policy.requires_grad
    loss, metrics = objective.loss(model, batch)
    half = len(policy) // 2
    expected, c, r = dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], 0.1)
    torch.testing.assert_close(loss, expected.mean())
    assert metrics["reward_margin"] == pytest.approx(float((c - r).detach().mean()), abs=1e-6)
    assert any(p.requires_grad for p in model.parameters())  # the adapter is enabled again after the reference


def test_init_adapter_reference_is_the_starting_adapter_swapped_in_and_back(tokenizer) -> None:
    model = attach_adapter(build_tiny_llama(len(tokenizer), seed=7), PeftConfig(r=4, alpha=8, dropout=0.0), seed=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))  # the SFT stage's adapter
    model.eval()
    start = trainable_state(model)
    pristine = copy.deepcopy(model)  # the starting model, kept aside only to check against
    objective = build_objective("dpo", {"reference": "init_adapter"})
    objective.reference_state = start
    batch = objective.collate(_pairs(tokenizer), tokenizer.pad_token_id)
    loss, metrics = objective.loss(model, batch)  # policy == reference: margins 0, loss log 2 exactly
    assert metrics["reward_margin"] == 0.0 and float(loss.detach()) == pytest.approx(math.log(2), abs=1e-7)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05)  # the policy moves away from where it started
    moved = trainable_state(model)
    ref = reference_logps(model, batch, start)
    torch.testing.assert_close(ref, sequence_logps(pristine, batch)[0])  # the starting model's log-probs, not the base's
    assert all(torch.equal(moved[n], t) for n, t in trainable_state(model).items())  # the policy's tensors are back
    loss, _ = objective.loss(model, batch)  # the reference pass (a swap in place) comes before the policy's graph
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    with pytest.raises(FedlmError, match="`model.init_adapter` is not set"):
        validate_config(
            {
                "model": {"name": "tiny-random-llama"},
                "objective": {"name": "dpo", "reference": "init_adapter"},
                "data": {"train": "embedded:wordnet_prefs"},
            }
        )


def test_pairs_share_the_prompt_and_label_only_the_answer(tokenizer) -> None:
    record = read_records("embedded:wordnet_prefs")[0]
    pair = _pairs(tokenizer, 1)[0]
    for seq, answer in ((pair.chosen, record["chosen"]), (pair.rejected, record["rejected"])):
        start = next(i for i, label in enumerate(seq.labels) if label != IGNORE_INDEX)
        assert all(label == IGNORE_INDEX for label in seq.labels[:start])
        assert seq.labels[start:] == seq.input_ids[start:]
        assert tokenizer.decode(seq.input_ids[start:]).startswith(answer)
        prompt_len = start
    assert pair.chosen.input_ids[:prompt_len] == pair.rejected.input_ids[:prompt_len]
    chat = {
        "chosen": [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["chosen"]}],
        "rejected": [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["rejected"]}],
    }
    same = build_objective("dpo").train_examples([chat], tokenizer, DATA, "c", ["x"])[0]
    assert same == pair  # the chat format gives the same tokens


def test_local_dpo_training_raises_the_reward_margin(tokenizer) -> None:
    pairs = _pairs(tokenizer, 8)
    model = attach_adapter(build_tiny_llama(len(tokenizer), seed=1), PeftConfig(r=4, alpha=8, dropout=0.0), seed=2)
    objective = build_objective("dpo", {"beta": 0.5})
    trainer = ClientTrainer(model, tokenizer.pad_token_id, torch.device("cpu"), objective=objective)
    start = trainable_state(model)
    update = trainer.train("c", pairs, start, LocalPlan(round=1, lrs=[1e-2] * 8, batch_size=4, seed=0))
    assert {"reward_margin", "preference_accuracy", "chosen_reward", "rejected_reward"} <= set(update.metrics)
    model.eval()
    _, metrics = objective.loss(model, objective.collate(pairs, tokenizer.pad_token_id))
    assert metrics["reward_margin"] > 0.0 and metrics["preference_accuracy"] > 0.5


def test_missing_rejected_names_the_columns_found_and_needed(tokenizer) -> None:
    records = [{"prompt": "p", "chosen": "a", "domain": "x"}]
    with pytest.raises(FedlmError) as err:
        build_objective("dpo").check_records(records, "data.train", DATA)
    message = str(err.value)
    assert "`data.train`" in message and "`rejected`" in message and "`prompt`, `chosen` and `rejected`" in message
    assert "it has columns `chosen`, `domain`, `prompt`" in message


def test_dpo_on_alpaca_data_is_one_clear_error(tokenizer) -> None:
    data = DataConfig(train="embedded:wordnet_defs", max_train_examples=16)
    with pytest.raises(FedlmError) as err:
        prepare_federated_data(data, PartitionConfig(), EvalConfig(), tokenizer, 0, objective=build_objective("dpo"))
    message = str(err.value)
    assert "objective: dpo" in message and "`chosen`" in message and "`rejected`" in message
    assert "`instruction`" in message and "`output`" in message


def test_chat_pairs_must_share_the_prompt(tokenizer) -> None:
    record = {
        "chosen": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "user", "content": "b?"}, {"role": "assistant", "content": "no"}],
    }
    with pytest.raises(FedlmError, match="must share the prompt"):
        build_objective("dpo").train_examples([record], tokenizer, DATA, "c", ["data.train example 0"])


def test_config_checks_name_the_field() -> None:
    with pytest.raises(FedlmError, match=r"`objective.name` 'ppo' is unknown; valid: clm, dpo, sft"):
        validate_config({"objective": "ppo"})
    with pytest.raises(FedlmError, match=r"`objective.beta`"):
        validate_config({"objective": {"name": "dpo", "beta": 0}})
    with pytest.raises(FedlmError, match=r"`privacy.sample_dp` cannot run with `objective: dpo`"):
        validate_config({"objective": "dpo", "privacy": {"sample_dp": {"noise_multiplier": 1.0}}})
    with pytest.raises(FedlmError, match=r"`attack.name: backdoor` .* needs `objective: sft`"):
        validate_config({"objective": "clm", "attack": {"name": "backdoor", "fraction": 0.2}})
    with pytest.raises(FedlmError, match=r"`eval.audit` needs `objective: sft`"):
        validate_config({"objective": "clm", "eval": {"audit": {"canaries": 2}}})
    if "full" in typing.get_args(PeftConfig.model_fields["method"].annotation):  # full fine-tuning keeps no frozen base
        with pytest.raises(FedlmError, match=r"`objective: dpo` needs an adapter"):
            validate_config({"objective": "dpo", "peft": {"method": "full"}})
    assert validate_config({"objective": {"name": "dpo", "beta": 0.3}}).objective.params() == {"beta": 0.3}


def test_embedded_pairs_keep_the_sft_split_and_a_wrong_answer() -> None:
    train, test = read_records("embedded:wordnet_prefs"), read_records("embedded:wordnet_prefs/test")
    defs = {r["synset"]: r for r in read_records("embedded:wordnet_defs") + read_records("embedded:wordnet_defs/test")}
    assert not {r["word"].lower() for r in train} & {r["word"].lower() for r in test}
    for split in (train, test):
        chosen_of = {r["synset"]: r["chosen"] for r in split}
        for r in split:
            assert r["chosen"] != r["rejected"] and r["prompt"] == defs[r["synset"]]["instruction"]
            assert r["chosen"] == defs[r["synset"]]["output"]
            assert r["rejected"] == chosen_of[r["rejected_synset"]] and defs[r["rejected_synset"]]["domain"] == r["domain"]


def test_likelihood_accuracy_is_the_share_of_pairs_the_model_itself_prefers(tokenizer) -> None:
    records = read_records("embedded:wordnet_prefs")[:6]
    objective = build_objective("dpo")
    test = objective.test_examples(records, tokenizer, DATA, [None] * 6, "test")
    model = attach_adapter(build_tiny_llama(len(tokenizer), seed=3), PeftConfig(r=4, alpha=8, dropout=0.0), seed=4)
    model.eval()
    rows = objective.score(model, test, tokenizer.pad_token_id, torch.device("cpu"), 4)
    summary = objective.summarize(rows)
    assert summary["preference_accuracy"] == 0.0 and summary["reward_margin"] == 0.0  # zero adapter: policy = reference
    batch = objective.collate([objective.train_examples([r], tokenizer, DATA, "c", ["x"])[0] for r in records], tokenizer.pad_token_id)
    with torch.no_grad():
        logps = sequence_logps(model, batch)[0]
    expected = float((logps[:6] > logps[6:]).float().mean())
    assert summary["likelihood_accuracy"] == pytest.approx(expected)
