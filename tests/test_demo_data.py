"""The demo's embedded dataset ``wordnet_domains`` (built by ``scripts/build_wordnet_domains.py``) and the demo config:
the shipped files are what the script builds, every word keeps its ``wordnet_defs`` split, and the answer is the
word's category, one of the eight names the question lists."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from fedlm.config.io import load_config
from fedlm.data.prepare import load_split_records
from fedlm.data.readers import EMBEDDED_DIR

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    spec = importlib.util.spec_from_file_location("build_wordnet_domains", ROOT / "scripts" / "build_wordnet_domains.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_shipped_files_are_what_the_script_builds(tmp_path: Path, monkeypatch) -> None:
    builder = _builder()
    monkeypatch.setattr("sys.argv", ["build", "--out", str(tmp_path)])
    builder.main()
    for name in ("train.jsonl", "test.jsonl", "LICENSE"):
        assert (tmp_path / name).read_bytes() == (EMBEDDED_DIR / "wordnet_domains" / name).read_bytes(), name


def test_every_word_keeps_its_split_and_its_category_is_one_of_the_listed_eight() -> None:
    categories = _builder().CATEGORIES
    assert len(categories) == 8
    for split in ("train", "test"):
        defs = _jsonl(EMBEDDED_DIR / "wordnet_defs" / f"{split}.jsonl")
        domains = _jsonl(EMBEDDED_DIR / "wordnet_domains" / f"{split}.jsonl")
        assert [(d["word"], d["synset"]) for d in defs] == [(q["word"], q["synset"]) for q in domains]
        for record in domains:
            assert record["output"] == record["domain"].split(".")[1]
            assert record["output"] in categories
            assert all(name in record["instruction"] for name in categories)
            assert f'"{record["word"]}"' in record["instruction"]


def test_demo_config_reads_its_embedded_data_with_one_category_per_client() -> None:
    config = load_config(ROOT / "examples" / "demo.yaml")
    assert config.data.train == "embedded:wordnet_domains"
    train, test = load_split_records(config.data, config.seed)
    assert len(test) == 320 and len(train) == 4000
    assert {r["output"] for r in test} == set(_builder().CATEGORIES)
