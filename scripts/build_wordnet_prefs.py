"""Build the embedded preference dataset ``embedded:wordnet_prefs`` (alignment, ``objective: dpo``).

One pair per example of ``embedded:wordnet_defs`` (same split, same words, same prompt):

* ``prompt``: the instruction of the SFT data, e.g. ``What does the noun "fudge" mean?``, so a DPO stage after SFT
  sees exactly the prompts it was tuned on;
* ``chosen``: the word's WordNet 3.0 definition (the SFT target);
* ``rejected``: the definition of another word of the same domain and split, drawn with the seed (a fluent,
  on-topic, wrong answer), never equal to the chosen text.

Train pairs come from ``wordnet_defs/train.jsonl`` and test pairs from ``wordnet_defs/test.jsonl``, so the split is by
word (no word, and no rejected answer, crosses splits). The build is deterministic (fixed seed, input order): running
it again gives byte-identical files.

Usage::

    python scripts/build_wordnet_prefs.py
    python scripts/build_wordnet_prefs.py --defs src/fedlm/data/embedded/wordnet_defs \
        --out src/fedlm/data/embedded/wordnet_prefs
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240603


def read_jsonl(path: Path) -> list[dict]:
    """Every JSON object of a JSONL file."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def pairs(records: list[dict], rng: random.Random) -> list[dict]:
    """One preference pair per record; the rejected answer is another same-domain record's definition."""
    by_domain: dict[str, list[dict]] = {}
    for record in records:
        by_domain.setdefault(record["domain"], []).append(record)
    out = []
    for record in records:
        pool = by_domain[record["domain"]]
        while True:
            other = pool[rng.randrange(len(pool))]
            if other["output"] != record["output"]:
                break
        out.append(
            {
                "prompt": record["instruction"],
                "chosen": record["output"],
                "rejected": other["output"],
                "domain": record["domain"],
                "word": record["word"],
                "pos": record["pos"],
                "synset": record["synset"],
                "rejected_synset": other["synset"],
            }
        )
    return out


def main() -> None:
    """Rebuild ``train.jsonl`` and ``test.jsonl``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defs", type=Path, default=Path("src/fedlm/data/embedded/wordnet_defs"))
    parser.add_argument("--out", type=Path, default=Path("src/fedlm/data/embedded/wordnet_prefs"))
    args = parser.parse_args()
    rng = random.Random(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        path = args.out / f"{split}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as handle:
            for pair in pairs(read_jsonl(args.defs / f"{split}.jsonl"), rng):
                handle.write(json.dumps(pair, ensure_ascii=False) + "\n")
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
