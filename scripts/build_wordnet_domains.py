"""Build the embedded short-answer dataset ``wordnet_domains``: which of 8 categories a word belongs to.

One question per word of ``embedded:wordnet_defs`` (same words, same train/test split): "Which category does the
noun "oak" belong to?", answered with one word, the name of the word's WordNet 3.0 lexicographer file without its
part of speech (``noun.plant`` -> ``plant``). The eight names are listed in every question, so a model that knows
the word can answer without fine-tuning; the answer is short enough for exact match to move.

Split one domain per client (``partition.method: by_field``, ``field: domain``) every organisation only ever sees one
answer: alone it learns to say its own category for every word, and only a federation (or pooled data) learns to tell
the eight apart. That is what ``make demo`` shows (``examples/demo.yaml``).

The build is deterministic (input order, no randomness): running it again gives byte-identical files.

Usage::

    python scripts/build_wordnet_domains.py
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "fedlm" / "data" / "embedded"
CATEGORIES = ("animal", "artifact", "body", "food", "person", "plant", "communication", "motion")


def category(domain: str) -> str:
    """``noun.plant`` -> ``plant``."""
    name = domain.split(".", 1)[1]
    if name not in CATEGORIES:
        raise ValueError(f"domain {domain!r} is not one of the eight categories {CATEGORIES}")
    return name


def read_jsonl(path: Path) -> list[dict]:
    """Every JSON object of a JSONL file."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def question(record: dict) -> dict:
    """The category question of one ``wordnet_defs`` record, in Alpaca format with the source fields kept."""
    listed = ", ".join(CATEGORIES[:-1]) + " or " + CATEGORIES[-1]
    return {
        "instruction": f'Which category does the {record["pos"]} "{record["word"]}" belong to? Answer with one word: {listed}.',
        "input": "",
        "output": category(record["domain"]),
        "domain": record["domain"],
        "word": record["word"],
        "pos": record["pos"],
        "synset": record["synset"],
    }


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, keys in insertion order."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--defs", type=Path, default=ROOT / "wordnet_defs")
    parser.add_argument("--out", type=Path, default=ROOT / "wordnet_domains")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        write_jsonl(args.out / f"{split}.jsonl", [question(r) for r in read_jsonl(args.defs / f"{split}.jsonl")])
    shutil.copyfile(args.defs / "LICENSE", args.out / "LICENSE")


if __name__ == "__main__":
    main()
