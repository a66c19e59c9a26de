"""Reading JSON, JSONL, CSV, Parquet and saved datasets; format detection names missing columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlm.core.errors import FedlmError
from fedlm.data.formats import detect_format, to_messages
from fedlm.data.readers import read_records

ROWS = [
    {"instruction": "Define cat", "input": "", "output": "a feline", "domain": "noun.animal"},
    {"instruction": "Define run", "input": "", "output": "move fast", "domain": "verb.motion"},
]


def test_every_file_type_reads_the_same_records(tmp_path: Path) -> None:
    import pandas as pd
    from datasets import Dataset

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "saved"):
        assert read_records(str(tmp_path / name)) == ROWS, name


def test_embedded_dataset_has_train_and_test() -> None:
    train = read_records("embedded:wordnet_defs")
    test = read_records("embedded:wordnet_defs/test")
    assert len(train) == 4000 and len(test) == 320
    assert {r["word"] for r in train}.isdisjoint({r["word"] for r in test})
    assert len({r["domain"] for r in train}) == 8


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(FedlmError, match=r"`data.train`: .*does not exist"):
        read_records(str(tmp_path / "none.jsonl"))
    (tmp_path / "x.xml").write_text("hi")
    with pytest.raises(FedlmError, match="unknown file type '.xml'"):
        read_records(str(tmp_path / "x.xml"))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(FedlmError, match="line 2 is not JSON"):
        read_records(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FedlmError, match="embedded dataset 'embedded:nope' does not exist"):
        read_records("embedded:nope")


def test_format_detection_and_missing_columns() -> None:
    assert detect_format(ROWS, "auto", "data.train") == "alpaca"
    assert detect_format([{"messages": []}], "auto", "data.train") == "messages"
    with pytest.raises(FedlmError, match=r"needs columns `instruction` and `output`.*it has: prompt, response"):
        detect_format([{"prompt": "a", "response": "b"}], "auto", "data.train")
    with pytest.raises(FedlmError, match=r"`data.train` is `data.format: alpaca` but lacks column\(s\) output"):
        detect_format([{"instruction": "a"}], "alpaca", "data.train")


def test_chat_messages_are_checked() -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert to_messages(good, "messages", None, "ex 0")[-1]["content"] == "yo"
    with pytest.raises(FedlmError, match="last message must be the assistant"):
        to_messages({"messages": [{"role": "user", "content": "hi"}]}, "messages", None, "ex 0")
    with pytest.raises(FedlmError, match="ex 3: each message needs `role`"):
        to_messages({"messages": [{"role": "bot", "content": "hi"}]}, "messages", None, "ex 3")
