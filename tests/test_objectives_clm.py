"""objective: clm: packing raw text into fixed-length blocks, labels, the loss, bad input, the embedded text data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlm.config import DataConfig, EvalConfig, PartitionConfig, PeftConfig
from fedlm.core.errors import FedlmError
from fedlm.data.prepare import prepare_federated_data
from fedlm.data.readers import EMBEDDED_DIR, read_records
from fedlm.models.adapters import attach_adapter
from fedlm.models.tiny import build_byte_tokenizer, build_tiny_llama
from fedlm.objectives import build_objective

BLOCK = 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # faster than two threads on a small shared machine


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def _stream(records, tokenizer) -> list[int]:
    """Every document's tokens followed by EOS, concatenated: what packing must cover."""
    return [t for r in records for t in (*tokenizer(r["text"], add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)]


def test_blocks_have_the_configured_length_and_lose_only_the_final_remainder(tokenizer) -> None:
    records = read_records("embedded:wordnet_text")[:5]
    objective = build_objective("clm", {"block_size": BLOCK})
    blocks = objective.train_examples(records, tokenizer, DataConfig(max_length=256), "client 'a'", ["x"] * len(records))
    assert blocks and all(len(b.input_ids) == BLOCK for b in blocks)
    stream = _stream(records, tokenizer)
    assert len(stream) // BLOCK == len(blocks)  # every full block is kept
    packed = [t for b in blocks for t in b.input_ids]
    assert packed == stream[: len(packed)]  # in order, nothing lost or repeated
    assert 0 <= len(stream) - len(packed) < BLOCK  # only the final remainder is dropped
    assert packed.count(tokenizer.eos_token_id) >= len(records) - 1  # documents separated by EOS
    assert all(b.labels == b.input_ids for b in blocks)  # the model shifts the labels itself


def test_block_size_defaults_to_max_length(tokenizer) -> None:
    records = read_records("embedded:wordnet_text")[:2]
    blocks = build_objective("clm").train_examples(records, tokenizer, DataConfig(max_length=40), "c", ["x", "y"])
    assert {len(b.input_ids) for b in blocks} == {40}


def test_model_loss_on_a_block_is_the_shifted_cross_entropy(tokenizer) -> None:
    objective = build_objective("clm", {"block_size": BLOCK})
    block = objective.train_examples(read_records("embedded:wordnet_text")[:1], tokenizer, DataConfig(), "c", ["x"])[0]
    model = attach_adapter(build_tiny_llama(len(tokenizer), seed=3), PeftConfig(r=4, alpha=8, dropout=0.0), seed=4)
    model.eval()
    batch = objective.collate([block], tokenizer.pad_token_id)
    loss, metrics = objective.loss(model, batch)
    ids = torch.tensor([block.input_ids])
    logits = model(input_ids=ids).logits
    manual = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])  # token t predicts token t + 1
    torch.testing.assert_close(loss, manual)
    assert batch["attention_mask"].all() and metrics == {}  # no padding in a packed batch


def test_each_client_packs_only_its_own_documents(tokenizer) -> None:
    data = DataConfig(train="embedded:wordnet_text", max_train_examples=24, max_length=BLOCK)
    fed = prepare_federated_data(data, PartitionConfig(), EvalConfig(max_examples=6), tokenizer, 0, objective=build_objective("clm"))
    assert len(fed.client_names) == 8
    for name in fed.client_names:
        assert fed.client_train[name] and all(len(b.input_ids) == BLOCK for b in fed.client_train[name])
    assert fed.test and all(len(ex.tokens.input_ids) == BLOCK for ex in fed.test)
    assert {ex.client for ex in fed.test} <= set(fed.client_names) | {None}


def test_txt_files_are_documents(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "hospital").mkdir()
    (tmp_path / "hospital" / "a.txt").write_text("The patient was discharged after three days. " * 3)
    (tmp_path / "b.txt").write_text("Quarterly results were reported on Monday. " * 3)
    records = read_records(str(tmp_path))
    assert [r["file"] for r in records] == ["b.txt", "hospital/a.txt"] and records[1]["folder"] == "hospital"
    assert read_records(str(tmp_path / "b.txt"))[0]["text"] == records[0]["text"]
    blocks = build_objective("clm", {"block_size": 32}).train_examples(records, tokenizer, DataConfig(), "c", ["x", "y"])
    assert [t for b in blocks for t in b.input_ids] == _stream(records, tokenizer)[: 32 * len(blocks)]


def test_text_too_short_for_one_block_is_a_clear_error(tokenizer) -> None:
    objective = build_objective("clm", {"block_size": 512})
    with pytest.raises(FedlmError, match=r"client 'a': its text gives 11 tokens .* fewer than one block of 512.*block_size"):
        objective.train_examples([{"text": "short text"}], tokenizer, DataConfig(), "client 'a'", ["x"])


def test_clm_on_instruction_data_names_the_columns(tokenizer) -> None:
    data = DataConfig(train="embedded:wordnet_defs", max_train_examples=16)
    with pytest.raises(FedlmError) as err:
        prepare_federated_data(data, PartitionConfig(), EvalConfig(), tokenizer, 0, objective=build_objective("clm"))
    message = str(err.value)
    assert "`data.train`" in message and "objective: clm" in message and "`text`" in message
    assert "`instruction`" in message and "`output`" in message  # the columns it has


def test_embedded_text_splits_share_no_word_and_stay_small() -> None:
    folder = EMBEDDED_DIR / "wordnet_text"

    def words(split: str) -> set[str]:
        lines = [line for r in map(json.loads, (folder / f"{split}.jsonl").read_text().splitlines()) for line in r["text"].split("\n")]
        return {w.lower() for line in lines for w in line.split(" (", 1)[0].split(", ")}

    assert not words("train") & words("test")
    defs_test = {json.loads(line)["word"].lower() for line in (EMBEDDED_DIR / "wordnet_defs" / "test.jsonl").read_text().splitlines()}
    assert not words("train") & defs_test  # the SFT stage's held-out words never appear in pre-training text
    assert all((folder / f).stat().st_size < 2_000_000 for f in ("train.jsonl", "test.jsonl"))
    assert {r["domain"] for r in read_records("embedded:wordnet_text")} == {r["domain"] for r in read_records("embedded:wordnet_defs")}
