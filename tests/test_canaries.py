"""Canaries (Carlini et al. 2019) and the client-model audit on the tiny model: insertion into one client's training
data, exposure of planted vs never-planted canaries after an overfit run, saved local adapters = start + delta,
the audit at the end of `fedlm run` and in report.md, and bad `eval.audit` input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_config

from fedlm.aggregation.lora_structure import truncate_to_rank
from fedlm.attacks.harness import record_poisoner
from fedlm.cli import app
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.data.prepare import prepare_federated_data
from fedlm.federation.checkpoint import list_checkpoints, load_checkpoint
from fedlm.models.tiny import build_byte_tokenizer
from fedlm.objectives import build_objective
from fedlm.privacy.canary_audit import CANARY_PROMPT, canary_examples, canary_inserter, canary_record, canary_set, compose_transforms
from fedlm.privacy.client_models import client_model_path, load_client_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IID = {"method": "iid", "num_clients": 3, "field": None}


def _prepared(tmp_path: Path, **audit):
    config = validate_config(
        tiny_config(
            tmp_path,
            partition=IID,
            data={"max_train_examples": 30, "max_length": 64},
            eval={"audit": {"canaries": 3, "canary_repetitions": 5, "canary_references": 50, **audit}},
        )
    )
    tok = build_byte_tokenizer()
    data = prepare_federated_data(
        config.data, config.partition, config.eval, tok, config.seed, canary_inserter(config), objective=build_objective("sft")
    )
    return config, tok, data


def test_canaries_go_into_the_chosen_clients_training_set_only(tmp_path: Path) -> None:
    config, tok, data = _prepared(tmp_path, canary_client="1")
    canaries = canary_set(config, data.client_names)
    assert canaries is not None and canaries.client == "1"
    assert len(set(canaries.planted + canaries.controls + canaries.references)) == 3 + 3 + 50  # all distinct
    planted = [tuple(ex.input_ids) for ex in canary_examples(canaries.planted, tok, config)]
    for name in data.client_names:
        ids = [tuple(ex.input_ids) for ex in data.client_train[name]]
        assert [ids.count(p) for p in planted] == ([5, 5, 5] if name == "1" else [0, 0, 0])
    assert not {tuple(ex.tokens.input_ids) for ex in data.test} & set(planted)
    assert CANARY_PROMPT in tok.decode(list(planted[0])) and canaries.planted[0] in tok.decode(list(planted[0]))
    # deterministic under the seed; another seed plants other secrets
    again_config, _, again = _prepared(tmp_path, canary_client="1")
    assert canary_set(again_config, again.client_names) == canaries
    assert [ex.input_ids for ex in again.client_train["1"]] == [ex.input_ids for ex in data.client_train["1"]]
    other = validate_config({**tiny_config(tmp_path, partition=IID), "seed": 1, "eval": {"audit": {"canaries": 3}}})
    assert canary_set(other, data.client_names).planted != canaries.planted  # type: ignore[union-attr]


def test_canaries_default_to_the_first_client_and_follow_the_data_format(tmp_path: Path) -> None:
    assert canary_record("123456", "alpaca") == {"instruction": CANARY_PROMPT, "output": "123456"}
    assert canary_record("123456", "messages")["messages"][-1] == {"role": "assistant", "content": "123456"}
    chats = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]} for i in range(12)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    config = validate_config(
        tiny_config(
            tmp_path,
            partition={"method": "iid", "num_clients": 2, "field": None},
            data={"train": str(tmp_path / "chat.jsonl")},
            federation={"clients_per_round": 2},
            eval={"audit": {"canaries": 2, "canary_repetitions": 2}},
        )
    )
    tok = build_byte_tokenizer()
    data = prepare_federated_data(
        config.data, config.partition, config.eval, tok, config.seed, canary_inserter(config), objective=build_objective("sft")
    )
    canaries = canary_set(config, data.client_names)
    assert canaries is not None and canaries.client == data.client_names[0]
    planted = [tuple(ex.input_ids) for ex in canary_examples(canaries.planted, tok, config)]
    assert [[tuple(ex.input_ids) for ex in data.client_train[c]].count(planted[0]) for c in data.client_names] == [2, 0]


def test_an_unknown_canary_client_is_refused(runner, tmp_path: Path) -> None:
    with pytest.raises(FedlmError, match=r"`eval.audit.canary_client` 'nobody' is not a client"):
        _prepared(tmp_path, canary_client="nobody")
    cfg = tiny_config(tmp_path / "run", eval={"audit": {"canary_client": "nobody", "client_model": True}})
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", cfg))])
    assert result.exit_code == 2 and "`eval.audit.canary_client`" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("bad", [{"canaries": -1}, {"canary_repetitions": 0}, {"canary_references": 0}, {"max_examples": 1}, {"canary": 3}])
def test_bad_audit_values_are_refused_at_load(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(FedlmError, match=f"`eval.audit.{next(iter(bad))}`"):
        validate_config(tiny_config(tmp_path, eval={"audit": bad}))


OVERFIT = dict(
    peft={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
    data={"max_train_examples": 16, "max_length": 64},
    partition={"method": "iid", "num_clients": 2, "field": None},
    federation={"rounds": 2, "clients_per_round": 2, "local_steps": 30, "batch_size": 8, "lr": 0.01},
    eval={
        "every": 0,
        "at_start": False,
        "generate": False,
        "max_examples": 8,
        "audit": {"canaries": 4, "canary_repetitions": 8, "canary_references": 255, "client_model": True, "max_examples": 8},
    },
)


def test_planted_canaries_are_exposed_and_controls_are_not(runner, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", **OVERFIT))
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    for part in (report, report["client_model"]):
        c = part["canaries"]
        assert c["canaries"] == 4 and c["references"] == 255 and c["max_possible_bits"] == pytest.approx(8.0)
        assert c["mean_exposure_bits"] > c["control"]["mean_exposure_bits"] + 2.0, c
    assert report["client_model"]["client"] == "0" and report["client_model"]["round"] == 2
    assert {"loss", "zlib", "min_k"} <= set(report["client_model"])
    text = (tmp_path / "run" / "report.md").read_text()
    assert "## Privacy audit" in text and "no differential privacy" in text and "client 0 (local, round 2)" in text
    assert "Canary exposure" in text


def test_saved_client_models_are_start_plus_delta(runner, tmp_path: Path) -> None:
    """One client per round under naive FedAvg: the new global is start + delta, so a client's saved local adapter is
    the next checkpoint's global cut to the client's rank (its start was the global cut to that rank)."""
    ranks = {"0": 4, "1": 2}  # the seed samples client 1 in every round
    cfg = tiny_config(
        tmp_path / "run",
        peft={"r": 4, "alpha": 8, "dropout": 0.0, "client_ranks": ranks},
        partition={"method": "iid", "num_clients": 2, "field": None},
        federation={"rounds": 3, "clients_per_round": 1, "local_steps": 2, "batch_size": 4, "lr": 0.01, "keep_checkpoints": 3},
        eval={
            "every": 0,
            "at_start": False,
            "generate": False,
            "max_examples": 8,
            "audit": {"client_model": True, "canary_client": "1", "max_examples": 4},
        },
    )
    assert runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", cfg))]).exit_code == 0
    checkpoints = {load_checkpoint(p).round: load_checkpoint(p).global_state for p in list_checkpoints(tmp_path / "run" / "checkpoints")}
    saved = 0
    for client, rank in ranks.items():
        path = client_model_path(tmp_path / "run", client)
        if not path.is_file():
            continue
        local, round_num = load_client_model(path)
        expected = truncate_to_rank(checkpoints[round_num], rank)
        assert set(local) == set(expected)
        for name, tensor in local.items():
            torch.testing.assert_close(tensor, expected[name].float(), rtol=1e-5, atol=1e-6)
        saved += 1
    assert saved >= 1 and client_model_path(tmp_path / "run", "1").is_file()
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert report["client_model"]["client"] == "1" and report["client_model"]["round"] == 3 and "canaries" not in report


def test_canaries_are_planted_after_a_data_attack_and_survive_it(tmp_path: Path) -> None:
    """The attack's record poisoner runs first, then the canaries are appended: the planted secrets stay intact."""
    config = validate_config(
        tiny_config(
            tmp_path,
            partition=IID,
            data={"max_train_examples": 30, "max_length": 64},
            attack={"name": "corrupt_responses", "clients": ["0"]},
            eval={"audit": {"canaries": 2, "canary_repetitions": 3, "canary_references": 10}},
        )
    )
    tok = build_byte_tokenizer()
    transform = compose_transforms(record_poisoner(config), canary_inserter(config))
    data = prepare_federated_data(config.data, config.partition, config.eval, tok, config.seed, transform, objective=build_objective("sft"))
    clean = prepare_federated_data(
        config.data, config.partition, config.eval, tok, config.seed, canary_inserter(config), objective=build_objective("sft")
    )
    planted = [tuple(ex.input_ids) for ex in canary_examples(canary_set(config, data.client_names).planted, tok, config)]  # type: ignore[union-attr]
    ids = [tuple(ex.input_ids) for ex in data.client_train["0"]]
    assert [ids.count(p) for p in planted] == [3, 3] and ids[-6:] == [p for p in planted for _ in range(3)]
    assert ids != [tuple(ex.input_ids) for ex in clean.client_train["0"]]  # the attack did rewrite the rest
