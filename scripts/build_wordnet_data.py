"""Build the embedded WordNet-definitions instruction dataset shipped with fedlm.

Parses the WordNet 3.0 database files (``data.<pos>`` and ``index.<pos>``, as
documented in wndb(5)) directly, and writes Alpaca-format JSONL files
(``train.jsonl`` / ``test.jsonl``) whose examples ask for the definition of a
word and whose targets are the WordNet gloss definitions.  Each example carries
its lexicographer domain (e.g. ``noun.animal``), which gives the data a natural
client split for federated experiments.

The build is deterministic: a fixed seed, sorted inputs, and no arguments are
needed (defaults read Debian's ``wordnet-base`` install).

Usage::

    python scripts/build_wordnet_data.py
    python scripts/build_wordnet_data.py --wordnet-dir /usr/share/wordnet \
        --out src/fedlm/data/embedded/wordnet_defs
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SEED = 20240601
DOMAINS: tuple[str, ...] = (
    "noun.animal",
    "noun.plant",
    "noun.food",
    "noun.body",
    "noun.artifact",
    "noun.person",
    "verb.motion",
    "verb.communication",
)
N_TRAIN = 500
N_TEST = 40
MAX_LEMMA_WORDS = 3
MIN_GLOSS_WORDS = 3
MAX_GLOSS_WORDS = 30

# WordNet 3.0 lexicographer file names, indexed by lex_filenum (lexnames(5)).
# Used when the database directory has no ``lexnames`` file (Debian omits it).
LEXNAMES: tuple[str, ...] = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
POS_FILES: dict[str, str] = {"noun": "noun", "verb": "verb", "adj": "adj", "adv": "adv"}
SS_TYPE_POS: dict[str, str] = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
POS_LETTER: dict[str, str] = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
INSTRUCTION = 'What does the {pos_word} "{word}" mean?'
POS_WORDS: dict[str, str] = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


@dataclass(frozen=True)
class Example:
    """One Alpaca-format instruction example with its provenance fields."""

    instruction: str
    input: str
    output: str
    domain: str
    word: str
    pos: str
    synset: str


def load_lexnames(wordnet_dir: Path) -> tuple[str, ...]:
    """Return lexicographer names by file number, from ``lexnames`` if present."""
    path = wordnet_dir / "lexnames"
    if not path.exists():
        return LEXNAMES
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            names[int(parts[0])] = parts[1]
    return tuple(names[i] for i in sorted(names))


def clean_gloss(gloss: str) -> str:
    """Keep only the definition part of a gloss (drop extra clauses and examples).

    The definition is the text before the first top-level ``;`` (glosses list
    further clauses and quoted example sentences after semicolons); a quoted
    example introduced by ``:`` or ``,`` (e.g. ``roll around, "pigs ..."``) is
    also removed.
    """
    depth = 0
    end = len(gloss)
    for i, ch in enumerate(gloss):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == ";" and depth == 0:
            end = i
            break
    definition = gloss[:end]
    quoted_example = re.search(r'[,:]\s*"', definition)
    if quoted_example:
        definition = definition[: quoted_example.start()]
    return definition.strip().rstrip(",:;").strip()


def clean_lemma(lemma: str) -> str:
    """Turn a database lemma into display form (spaces, no adjective marker)."""
    lemma = re.sub(r"\((a|p|ip)\)$", "", lemma)
    return lemma.replace("_", " ").strip()


def parse_data_line(line: str, lexnames: tuple[str, ...]) -> dict[str, str] | None:
    """Parse one ``data.<pos>`` line into synset id, domain, first lemma and gloss."""
    if line.startswith("  ") or " | " not in line:
        return None  # licence header lines, or a synset without a gloss
    fields_part, gloss = line.split(" | ", 1)
    fields = fields_part.split()
    offset, lex_filenum, ss_type = fields[0], int(fields[1]), fields[2]
    pos = SS_TYPE_POS[ss_type]
    return {
        "synset": f"{offset}-{POS_LETTER[pos]}",
        "domain": lexnames[lex_filenum],
        "pos": pos,
        "lemma": fields[4],
        "gloss": gloss.strip(),
    }


def load_sense_ranks(wordnet_dir: Path, pos: str) -> dict[tuple[str, str], int]:
    """Map (lemma, synset id) to its sense number from ``index.<pos>`` (0 = most frequent)."""
    ranks: dict[tuple[str, str], int] = {}
    letter = POS_LETTER[pos]
    text = (wordnet_dir / f"index.{POS_FILES[pos]}").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("  "):
            continue
        parts = line.split()
        lemma, synset_cnt, p_cnt = parts[0], int(parts[2]), int(parts[3])
        offsets = parts[4 + p_cnt + 2 : 4 + p_cnt + 2 + synset_cnt]
        for rank, off in enumerate(offsets):
            ranks[(lemma.lower(), f"{off}-{letter}")] = rank
    return ranks


def is_eligible(word: str, definition: str) -> bool:
    """Apply the lemma and definition filters."""
    if any(ch.isdigit() for ch in word) or len(word.split()) > MAX_LEMMA_WORDS:
        return False
    if not definition or '"' in definition or definition.endswith(("e.g.", "i.e.")):
        return False
    return MIN_GLOSS_WORDS <= len(definition.split()) <= MAX_GLOSS_WORDS


def make_example(entry: dict[str, str]) -> Example | None:
    """Turn a parsed synset into an example, or None if it fails the filters."""
    word = clean_lemma(entry["lemma"])
    definition = clean_gloss(entry["gloss"])
    if not is_eligible(word, definition):
        return None
    return Example(
        instruction=INSTRUCTION.format(pos_word=POS_WORDS[entry["pos"]], word=word),
        input="",
        output=definition,
        domain=entry["domain"],
        word=word,
        pos=entry["pos"],
        synset=entry["synset"],
    )


def collect_candidates(wordnet_dir: Path) -> dict[str, list[Example]]:
    """Collect eligible examples per selected domain, one per (word, pos).

    When a (word, pos) pair heads several eligible synsets, only its most
    frequent sense (lowest ``index.<pos>`` sense number) is kept, so every
    instruction has a single target answer.
    """
    lexnames = load_lexnames(wordnet_dir)
    best: dict[tuple[str, str], tuple[int, str, Example]] = {}
    for pos in sorted({d.split(".")[0] for d in DOMAINS}):
        ranks = load_sense_ranks(wordnet_dir, pos)
        text = (wordnet_dir / f"data.{POS_FILES[pos]}").read_text(encoding="utf-8")
        for line in text.splitlines():
            entry = parse_data_line(line, lexnames)
            if entry is None or entry["domain"] not in DOMAINS:
                continue
            example = make_example(entry)
            if example is None:
                continue
            rank = ranks.get((entry["lemma"].lower(), entry["synset"]), 10**6)
            key = (example.word.lower(), pos)
            candidate = (rank, example.synset, example)
            if key not in best or candidate[:2] < best[key][:2]:
                best[key] = candidate
    per_domain: dict[str, list[Example]] = {d: [] for d in DOMAINS}
    for _, _, example in best.values():
        per_domain[example.domain].append(example)
    for examples in per_domain.values():
        examples.sort(key=lambda e: e.synset)
    return per_domain


def split_examples(per_domain: dict[str, list[Example]], rng: random.Random) -> tuple[list[Example], list[Example]]:
    """Sample N_TEST test then N_TRAIN train examples per domain, disjoint by word.

    Test words are drawn first for every domain; train examples are then drawn
    only from words (case-insensitive, any part of speech) never used in test.
    """
    shuffled = {d: rng.sample(per_domain[d], len(per_domain[d])) for d in DOMAINS}
    test: list[Example] = []
    test_words: set[str] = set()
    for domain in DOMAINS:
        chosen = shuffled[domain][:N_TEST]
        if len(chosen) < N_TEST:
            raise ValueError(f"{domain}: only {len(chosen)} candidates for test")
        test.extend(chosen)
        test_words.update(e.word.lower() for e in chosen)
    train: list[Example] = []
    for domain in DOMAINS:
        pool = [e for e in shuffled[domain][N_TEST:] if e.word.lower() not in test_words]
        if len(pool) < N_TRAIN:
            raise ValueError(f"{domain}: only {len(pool)} candidates for train")
        train.extend(pool[:N_TRAIN])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_jsonl(path: Path, examples: list[Example]) -> None:
    """Write examples as one compact JSON object per line (UTF-8, LF endings)."""
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for example in examples:
            fh.write(json.dumps(asdict(example), ensure_ascii=False) + "\n")


def summarize(out: Path, train: list[Example], test: list[Example]) -> None:
    """Print per-domain counts, file sizes and a few sample lines."""
    print(f"{'domain':<22}{'train':>7}{'test':>6}")
    for domain in DOMAINS:
        n_tr = sum(e.domain == domain for e in train)
        n_te = sum(e.domain == domain for e in test)
        print(f"{domain:<22}{n_tr:>7}{n_te:>6}")
    total = 0
    for name in ("train.jsonl", "test.jsonl"):
        size = (out / name).stat().st_size
        total += size
        print(f"{name}: {size} bytes")
    print(f"total: {total} bytes")
    for example in train[:3]:
        print(json.dumps(asdict(example), ensure_ascii=False))


def parse_args() -> argparse.Namespace:
    """Parse command-line options (all optional)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=Path("src/fedlm/data/embedded/wordnet_defs"))
    return parser.parse_args()


def main() -> None:
    """Rebuild train.jsonl and test.jsonl from the WordNet database."""
    args = parse_args()
    per_domain = collect_candidates(args.wordnet_dir)
    train, test = split_examples(per_domain, random.Random(SEED))
    train_words = {e.word.lower() for e in train}
    assert not train_words & {e.word.lower() for e in test}, "train/test word overlap"
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    summarize(args.out, train, test)


if __name__ == "__main__":
    main()
