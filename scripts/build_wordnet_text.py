"""Build the embedded raw-text dataset ``embedded:wordnet_text`` (federated continued pre-training, ``objective: clm``).

Each document is a stretch of a WordNet 3.0 domain written out as plain glossary text, one synset per line::

    lion, king of beasts, Panthera leo (noun): large gregarious predatory feline of Africa and India having ...

(every lemma of the synset, its part of speech, and the *full* gloss, example sentences included). Documents follow
WordNet's own order within a lexicographer file (related senses sit together) and carry their ``domain`` (the
lexname, e.g. ``noun.animal``), so ``partition.method: by_field`` gives one client per domain, as for
``embedded:wordnet_defs``.

Held-out words are shared with the instruction-tuning stage: every word of ``wordnet_defs/test.jsonl`` is a test
word here, so a pipeline clm -> sft -> dpo never trains on the definitions its SFT test set asks for.

* test: the synsets of the 8 domains with any lemma among those test words, in WordNet order, chunked into
  documents of ``ENTRIES_PER_DOC`` lines;
* train: the synsets none of whose lemmas occurs in any test synset (so no word is in both splits), chunked the
  same way, then ``TRAIN_DOCS`` documents per domain drawn with the seed.

The build is deterministic (fixed seed, sorted inputs): running it again gives byte-identical files.

Usage::

    python scripts/build_wordnet_text.py
    python scripts/build_wordnet_text.py --wordnet-dir /usr/share/wordnet \
        --defs src/fedlm/data/embedded/wordnet_defs --out src/fedlm/data/embedded/wordnet_text
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from build_wordnet_data import DOMAINS, POS_FILES, SS_TYPE_POS, clean_lemma, load_lexnames

SEED = 20240602
ENTRIES_PER_DOC = 12
TRAIN_DOCS = 90


@dataclass(frozen=True)
class Entry:
    """One synset as a line of glossary text."""

    offset: str
    domain: str
    pos: str
    lemmas: tuple[str, ...]
    gloss: str

    def line(self) -> str:
        return f"{', '.join(self.lemmas)} ({self.pos}): {self.gloss}"

    def words(self) -> set[str]:
        return {lemma.lower() for lemma in self.lemmas}


def parse_entry(line: str, lexnames: tuple[str, ...]) -> Entry | None:
    """One ``data.<pos>`` line (wndb(5)) with every lemma, or None for licence lines and gloss-less synsets."""
    if line.startswith("  ") or " | " not in line:
        return None
    fields_part, gloss = line.split(" | ", 1)
    fields = fields_part.split()
    count = int(fields[3], 16)
    lemmas = tuple(dict.fromkeys(clean_lemma(fields[4 + 2 * i]) for i in range(count)))
    return Entry(fields[0], lexnames[int(fields[1])], SS_TYPE_POS[fields[2]], lemmas, " ".join(gloss.split()))


def read_entries(wordnet_dir: Path) -> dict[str, list[Entry]]:
    """Entries of the 8 domains, in file (offset) order."""
    lexnames = load_lexnames(wordnet_dir)
    per_domain: dict[str, list[Entry]] = {d: [] for d in DOMAINS}
    for pos in sorted({d.split(".")[0] for d in DOMAINS}):
        for line in (wordnet_dir / f"data.{POS_FILES[pos]}").read_text(encoding="utf-8").splitlines():
            entry = parse_entry(line, lexnames)
            if entry is not None and entry.domain in per_domain:
                per_domain[entry.domain].append(entry)
    return per_domain


def test_words(defs_dir: Path) -> set[str]:
    """The held-out words of the instruction-tuning data (``wordnet_defs/test.jsonl``), lower case."""
    with (defs_dir / "test.jsonl").open(encoding="utf-8") as handle:
        return {json.loads(line)["word"].lower() for line in handle if line.strip()}


def documents(entries: list[Entry], domain: str) -> list[dict[str, object]]:
    """Consecutive entries chunked into documents (the last one may be shorter)."""
    docs = []
    for start in range(0, len(entries), ENTRIES_PER_DOC):
        chunk = entries[start : start + ENTRIES_PER_DOC]
        docs.append({"text": "\n".join(e.line() for e in chunk), "domain": domain, "entries": len(chunk)})
    return docs


def split(per_domain: dict[str, list[Entry]], held_out: set[str], rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Test documents from the held-out words' synsets; train documents from synsets sharing no word with them."""
    test_entries = {d: [e for e in per_domain[d] if e.words() & held_out] for d in DOMAINS}
    test_vocab = set().union(*(e.words() for entries in test_entries.values() for e in entries))
    train, test = [], []
    for domain in DOMAINS:
        test.extend(documents(test_entries[domain], domain))
        pool = documents([e for e in per_domain[domain] if not e.words() & test_vocab], domain)
        if len(pool) < TRAIN_DOCS:
            raise ValueError(f"{domain}: only {len(pool)} train documents")
        train.extend(rng.sample(pool, TRAIN_DOCS))
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One compact JSON object per line (UTF-8, LF endings)."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    """Rebuild ``train.jsonl`` and ``test.jsonl``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--defs", type=Path, default=Path("src/fedlm/data/embedded/wordnet_defs"))
    parser.add_argument("--out", type=Path, default=Path("src/fedlm/data/embedded/wordnet_text"))
    args = parser.parse_args()
    train, test = split(read_entries(args.wordnet_dir), test_words(args.defs), random.Random(SEED))
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"{'domain':<22}{'train docs':>11}{'test docs':>10}")
    for domain in DOMAINS:
        print(f"{domain:<22}{sum(r['domain'] == domain for r in train):>11}{sum(r['domain'] == domain for r in test):>10}")
    for name in ("train.jsonl", "test.jsonl"):
        print(f"{name}: {(args.out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
