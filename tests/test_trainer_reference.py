"""Tier 2: one federated client round equals a plain PyTorch + PEFT training loop written without fedlm."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from fedlm.config import PeftConfig
from fedlm.core.sampling import batch_indices
from fedlm.core.task import LocalPlan
from fedlm.data.collate import collate_for_loss
from fedlm.data.formats import to_messages
from fedlm.data.readers import read_records
from fedlm.data.tokenize import tokenize_conversation
from fedlm.federation.trainer import ClientTrainer
from fedlm.models.adapters import attach_adapter, trainable_state
from fedlm.models.tiny import build_byte_tokenizer, build_tiny_llama


def _examples(tokenizer):
    records = read_records("embedded:wordnet_defs")[:24]
    return [tokenize_conversation(tokenizer, to_messages(r, "alpaca", None, "x"), 96) for r in records]


def test_client_update_matches_a_plain_pytorch_loop() -> None:
    tokenizer = build_byte_tokenizer()
    examples = _examples(tokenizer)
    lrs, batch, seed = [3e-3, 2e-3, 1e-3], 4, 123

    model = attach_adapter(build_tiny_llama(len(tokenizer), seed=1), PeftConfig(r=4, alpha=8, dropout=0.0), seed=5)
    start = trainable_state(model)
    trainer = ClientTrainer(model, tokenizer.pad_token_id, torch.device("cpu"), weight_decay=0.0, max_grad_norm=None)
    update = trainer.train("c", examples, start, LocalPlan(round=1, lrs=lrs, batch_size=batch, seed=seed))

    # The reference: peft + torch.optim.AdamW + a hand-written loss over response tokens, same batches.
    ref = get_peft_model(
        build_tiny_llama(len(tokenizer), seed=1),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if param.requires_grad:
                param.copy_(start[name.replace(".default", "")])
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lrs[0], weight_decay=0.0)
    for lr, ids in zip(lrs, batch_indices(len(examples), len(lrs), batch, seed)):
        b = collate_for_loss([examples[i] for i in ids], tokenizer.pad_token_id)
        logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1), ignore_index=-100)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref_state = {n.replace(".default", ""): p.detach() for n, p in ref.named_parameters() if p.requires_grad}
    assert set(update.tensors) == set(ref_state)
    for name, delta in update.tensors.items():
        torch.testing.assert_close(start[name] + delta, ref_state[name], rtol=1e-5, atol=1e-6)
    assert any(delta.abs().max() > 0 for delta in update.tensors.values())
    assert update.num_examples == len(examples)
