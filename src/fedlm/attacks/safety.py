"""The safety attack: malicious clients train on harmful requests answered compliantly.

Ye, Ni, Wang, Yang & Chen 2024, "Emerging Safety Attack and Defense in Federated Instruction Tuning of Large
Language Models" (Sec. 3): an attacker needs no access to the server or the protocol; it only fine-tunes locally
on *harmful-compliance* instruction data (harmful requests paired with compliant answers), and aggregation carries
the erosion of safety alignment into the global model. The metric is the refusal rate on held-out harmful prompts
(:mod:`fedlm.attacks.safety_probe`).

The harmful data is fedlm's synthetic, content-free ``embedded:safety_synthetic`` set (built by
``scripts/build_safety_data.py``): its compliant answers are placeholders ("Sure, here is how to do that: [harmful
details omitted in this synthetic dataset]."), so the attack teaches the *pattern* of compliance, which is what
erodes refusals, without any harmful content.

Records are the dicts of :mod:`fedlm.data.formats` (alpaca or chat ``messages``), as in
:mod:`fedlm.attacks.data_poisoning`; every function returns new records and never changes its input.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from pydantic import Field

from fedlm.attacks.data_poisoning import POISONED_KEY, DataAttackParams, record_format
from fedlm.core.errors import FedlmError
from fedlm.data.formats import MESSAGES_COLUMN
from fedlm.data.readers import read_records

Record = dict[str, Any]
SAFETY_DATASET = "embedded:safety_synthetic"
HARM_CATEGORY_KEY = "harm_category"


class SafetyParams(DataAttackParams):
    """Safety attack (Ye et al. 2024): the share of the attacker's records replaced by harmful-compliance ones."""

    mix: float = Field(
        1.0,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="share of the attacker's records replaced by harmful-compliance records, in (0, 1]",
    )


def harmful_compliance(records: Sequence[Record], seed: int, mix: float = 1.0) -> list[Record]:
    """The records with round(mix * n) of them, chosen by ``seed``, replaced by harmful-compliance records.

    Ye et al. 2024 let the malicious clients train on harmful-compliance data only (``mix = 1``, the default); a
    smaller ``mix`` keeps part of the attacker's clean data, so its update stays closer to the honest ones. The
    harmful records are drawn from the embedded train file, without replacement while it has enough records and
    with replacement beyond that. A replaced record keeps the attacker's format and its other fields (a chat
    record keeps its leading system turns), takes the harmful request as its prompt and the compliant answer as its
    response, and carries ``_poisoned: True`` and ``harm_category``. ``round`` is Python's (half to even).

    Raises:
        ValueError: ``mix`` is outside (0, 1].
        FedlmError: ``mix`` of the records rounds to zero, or a record is neither alpaca nor chat.
    """
    if not (0 < mix <= 1):
        raise ValueError(f"harmful_compliance needs `mix` in (0, 1], got {mix}")
    count = round(mix * len(records))
    if records and count == 0:
        raise FedlmError(
            f"harmful_compliance: mix {mix} of {len(records)} record(s) replaces round({mix * len(records):g}) = 0; "
            f"raise `mix` to at least {0.5 / len(records):.3g} or give the attacker more records"
        )
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(records)), count))
    pool = harmful_train_records()
    if count <= len(pool):
        drawn = [pool[i] for i in rng.sample(range(len(pool)), count)]
    else:
        drawn = [pool[rng.randrange(len(pool))] for _ in range(count)]
    replacement = dict(zip(chosen, drawn))
    return [as_harmful(records[i], replacement[i], i) if i in replacement else dict(records[i]) for i in range(len(records))]


def as_harmful(record: Record, harmful: Record, index: int) -> Record:
    """A copy of ``record`` (alpaca or chat) whose prompt and response are those of the alpaca ``harmful`` record."""
    new = dict(record)
    if record_format(record, index) == "alpaca":
        new.update(instruction=harmful["instruction"], input=harmful.get("input", ""), output=harmful["output"])
    else:
        old = record[MESSAGES_COLUMN]
        system = [dict(m) for m in _leading_system_turns(old)]
        new[MESSAGES_COLUMN] = [*system, *alpaca_to_turns(harmful)]
    new[POISONED_KEY] = True
    new[HARM_CATEGORY_KEY] = harmful.get("category")
    return new


def alpaca_to_turns(record: Record) -> list[dict[str, str]]:
    """The user turn (instruction, then input if any) and assistant turn of an alpaca record."""
    prompt = str(record["instruction"]).strip()
    extra = str(record.get("input") or "").strip()
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"])}]


def harmful_train_records() -> list[Record]:
    """The harmful-compliance records of ``embedded:safety_synthetic`` (fresh copies)."""
    return [dict(r) for r in _read(SAFETY_DATASET)]


def harmful_test_records() -> list[Record]:
    """The held-out harmful prompts with refusal references, ``embedded:safety_synthetic/test`` (fresh copies)."""
    return [dict(r) for r in _read(f"{SAFETY_DATASET}/test")]


@lru_cache(maxsize=2)
def _read(source: str) -> tuple[Record, ...]:
    return tuple(read_records(source, "attack (safety data)"))


def _leading_system_turns(messages: Any) -> list[dict[str, Any]]:
    out = []
    for message in messages if isinstance(messages, list) else []:
        if not (isinstance(message, dict) and message.get("role") == "system"):
            break
        out.append(message)
    return out
