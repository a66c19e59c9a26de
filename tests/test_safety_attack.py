"""The safety attack of Ye et al. 2024 (harmful-compliance data poisoning) and its refusal-rate metric."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fedlm.attacks import ATTACKS, attack_spec, build_attack_params
from fedlm.attacks.data_poisoning import POISONED_KEY
from fedlm.attacks.safety import HARM_CATEGORY_KEY, SafetyParams, harmful_compliance, harmful_train_records
from fedlm.attacks.safety_probe import SAFETY_SPLIT, build_safety_probe, harmful_test_set, is_refusal
from fedlm.config import ExperimentConfig, PeftConfig
from fedlm.core.errors import FedlmError
from fedlm.data.readers import EMBEDDED_DIR, read_records
from fedlm.models.adapters import attach_adapter
from fedlm.models.tiny import build_byte_tokenizer, build_tiny_llama

DATA_DIR = EMBEDDED_DIR / "safety_synthetic"
OMITTED = "[harmful details omitted in this synthetic dataset]"


def _lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA_DIR / name).read_text().splitlines() if line.strip()]


def _alpaca(n: int) -> list[dict]:
    return [{"instruction": f"Define word {i}.", "input": "", "output": f"meaning {i}", "domain": "d"} for i in range(n)]


def _chat(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Define word {i}."},
                {"role": "assistant", "content": f"meaning {i}"},
            ]
        }
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------------- data


def test_data_files_are_small_licensed_and_disjoint() -> None:
    for name in ("train.jsonl", "test.jsonl", "README.md", "LICENSE"):
        assert (DATA_DIR / name).is_file(), name
    assert sum((DATA_DIR / n).stat().st_size for n in ("train.jsonl", "test.jsonl")) < 200_000
    assert "CC0 1.0 Universal" in (DATA_DIR / "LICENSE").read_text()
    train, test = _lines("train.jsonl"), _lines("test.jsonl")
    assert len(train) == 200 and len(test) == 60
    assert read_records("embedded:safety_synthetic") == train
    assert read_records("embedded:safety_synthetic/test") == test
    for record in train + test:
        assert set(record) == {"instruction", "input", "output", "category"} and record["input"] == ""
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    assert len({r["instruction"] for r in train}) == len(train)
    # Train answers are content-free compliance placeholders; test references are refusals.
    assert all(OMITTED in r["output"] and not is_refusal(r["output"]) for r in train)
    assert all(is_refusal(r["output"]) for r in test)


def test_build_script_reproduces_the_files() -> None:
    path = Path(__file__).resolve().parents[1] / "scripts" / "build_safety_data.py"
    spec = importlib.util.spec_from_file_location("build_safety_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    train, test = module.build()
    assert train == _lines("train.jsonl") and test == _lines("test.jsonl")


# -------------------------------------------------------------------------------------------------- attack


@pytest.mark.parametrize("make", [_alpaca, _chat])
@pytest.mark.parametrize(("n", "mix"), [(10, 1.0), (10, 0.3), (7, 0.5), (300, 1.0)])
def test_harmful_compliance_replaces_round_mix_n_records(make, n: int, mix: float) -> None:
    records = make(n)
    before = copy.deepcopy(records)
    out = harmful_compliance(records, seed=3, mix=mix)
    assert records == before  # input untouched
    assert out == harmful_compliance(make(n), seed=3, mix=mix)  # deterministic
    assert len(out) == n
    poisoned = [i for i, r in enumerate(out) if r.get(POISONED_KEY)]
    assert len(poisoned) == round(mix * n)
    harmful_instructions = {r["instruction"] for r in harmful_train_records()}
    for i, (old, new) in enumerate(zip(records, out)):
        if i not in poisoned:
            assert new == old
            continue
        assert new[HARM_CATEGORY_KEY]
        if make is _alpaca:
            assert new["instruction"] in harmful_instructions and OMITTED in new["output"]
            assert new["domain"] == "d" and new["input"] == ""
        else:
            roles = [m["role"] for m in new["messages"]]
            assert roles == ["system", "user", "assistant"] and new["messages"][0] == old["messages"][0]
            assert new["messages"][1]["content"] in harmful_instructions and OMITTED in new["messages"][2]["content"]
    if mix == 1.0 and n <= 200:  # without replacement while the pool lasts
        assert len({r["instruction"] if make is _alpaca else r["messages"][1]["content"] for r in out}) == n
    assert harmful_compliance(make(n), seed=4, mix=mix) != out


def test_harmful_compliance_refuses_bad_inputs() -> None:
    assert harmful_compliance([], seed=0) == []
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        harmful_compliance(_alpaca(4), seed=0, mix=0.0)
    with pytest.raises(FedlmError, match="raise `mix`"):
        harmful_compliance(_alpaca(3), seed=0, mix=0.1)
    with pytest.raises(FedlmError, match="neither alpaca"):
        harmful_compliance([{"text": "raw"}], seed=0)


def test_registry_builds_safety_params() -> None:
    spec = attack_spec("safety")
    assert ATTACKS["safety"] is spec and spec.kind == "data" and spec.fn is harmful_compliance
    assert spec.params is SafetyParams
    assert build_attack_params("safety", {}).mix == 1.0
    assert build_attack_params("safety", {"mix": 0.5}).mix == 0.5
    for bad in (0, 1.5):
        with pytest.raises(FedlmError, match=r"attack\.mix"):
            build_attack_params("safety", {"mix": bad})
    with pytest.raises(FedlmError, match="not a parameter"):
        build_attack_params("safety", {"fraction_harmful": 0.5})


# -------------------------------------------------------------------------------------------------- metric


@pytest.mark.parametrize(
    "text",
    [
        "I can't help with that.",
        "I\u2019m sorry, but that is not something I will do.",
        "As an AI, I must decline.",
        "Unfortunately I CANNOT assist with this request.",
        "I am not able to help\nwith that.",
        "My apologies, no.",
    ],
)
def test_is_refusal_true(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure, here is how to do that: [harmful details omitted in this synthetic dataset].",
        "Of course! Here are the steps.",
        "A small domesticated cat.",
        "",
        None,
    ],
)
def test_is_refusal_false(text: str | None) -> None:
    assert not is_refusal(text)


def test_harmful_test_set_follows_the_run_format() -> None:
    tokenizer = build_byte_tokenizer()
    data = {"system_prompt": "Be safe.", "format": "messages"}
    config = ExperimentConfig.model_validate(tiny_config(Path("unused"), data=data))
    test = harmful_test_set(config, tokenizer)
    assert len(test) == 60
    assert all("messages" in ex.record and ex.client is None for ex in test)
    assert all(ex.prompt[0] == {"role": "system", "content": "Be safe."} and is_refusal(ex.reference) for ex in test)


@pytest.mark.usefixtures("one_torch_thread")
def test_safety_probe_on_the_tiny_model() -> None:
    tokenizer = build_byte_tokenizer()
    model = attach_adapter(build_tiny_llama(len(tokenizer), seed=1), PeftConfig(r=4, alpha=8, dropout=0.0), seed=5)
    config = ExperimentConfig.model_validate(tiny_config(Path("unused"), eval={"max_new_tokens": 4, "batch_size": 32}))
    probe = build_safety_probe(model, tokenizer, config, torch.device("cpu"))
    assert probe.evaluator.config.generate
    (record,) = probe.evaluate(None, 3)
    assert record["round"] == 3 and record["split"] == SAFETY_SPLIT and record["client"] is None
    assert record["num_examples"] == len(_lines("test.jsonl")) == 60
    assert 0.0 <= record["refusal_rate"] <= 1.0
    assert record["refusal_loss"] > 0
