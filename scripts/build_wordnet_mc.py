"""Build the embedded multiple-choice task ``wordnet_mc`` (an lm-evaluation-harness task folder and a fedlm dataset).

One question per word of ``embedded:wordnet_defs``: "which gloss defines X", four choices:

* the word's WordNet 3.0 definition (the SFT target of ``wordnet_defs``), and
* three definitions of other words of the same domain and split, drawn with the seed (fluent, on-topic, wrong),
  all four texts different;
* the position of the right answer (``label``, 0-3) is drawn with the seed too.

``test.jsonl`` covers every test word of ``wordnet_defs`` (320, 40 per domain; no word of the SFT training split);
``train.jsonl`` is a seeded sample of 320 training words (a few-shot pool, or SFT data with choices). Each record is
at once an Alpaca record (``instruction``, ``input``, ``output`` = the right gloss) that fedlm reads as ``data.test``
and an lm-eval document (``question``, ``choices``, ``label``) that ``wordnet_mc.yaml`` reads through ``utils.py``.
The build is deterministic (fixed seed, input order): running it again gives byte-identical files.

Usage::

    python scripts/build_wordnet_mc.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20261201
CHOICES = 4
TRAIN_SAMPLE = 320
ROOT = Path(__file__).resolve().parents[1] / "src" / "fedlm" / "data" / "embedded"


def read_jsonl(path: Path) -> list[dict]:
    """Every JSON object of a JSONL file."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def questions(records: list[dict], rng: random.Random) -> list[dict]:
    """One four-choice question per record; distractors are other same-domain definitions of the same split."""
    by_domain: dict[str, list[str]] = {}
    for record in records:
        by_domain.setdefault(record["domain"], []).append(record["output"])
    out = []
    for record in records:
        pool = sorted(set(by_domain[record["domain"]]) - {record["output"]})
        wrong = rng.sample(pool, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices = [*wrong[:label], record["output"], *wrong[label:]]
        out.append(
            {
                "question": f'Which definition fits the {record["pos"]} "{record["word"]}"?',
                "choices": choices,
                "label": label,
                "instruction": record["instruction"],
                "input": "",
                "output": record["output"],
                "domain": record["domain"],
                "word": record["word"],
                "pos": record["pos"],
                "synset": record["synset"],
            }
        )
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, keys in insertion order."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--defs", type=Path, default=ROOT / "wordnet_defs")
    parser.add_argument("--out", type=Path, default=ROOT / "wordnet_mc")
    args = parser.parse_args()
    rng = random.Random(SEED)
    test = questions(read_jsonl(args.defs / "test.jsonl"), rng)
    train_all = read_jsonl(args.defs / "train.jsonl")
    keep = sorted(rng.sample(range(len(train_all)), TRAIN_SAMPLE))
    train = questions([train_all[i] for i in keep], rng)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "test.jsonl", test)
    write_jsonl(args.out / "train.jsonl", train)
    print(f"wrote {len(test)} test and {len(train)} train questions to {args.out}")


if __name__ == "__main__":
    main()
