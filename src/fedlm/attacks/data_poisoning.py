"""Data poisoning: how a malicious client changes its training records before it trains, deterministic under a seed.

Records are the dicts of :mod:`fedlm.data.formats`: alpaca (``instruction``, optional ``input``, ``output``) or
chat (``messages``, a list of ``{role, content}`` ending with the assistant's answer). The *response* of a record is
its ``output`` (alpaca) or the content of its last assistant turn (chat); its *prompt* ends with ``instruction``
(alpaca) or the last user turn (chat). Every function returns new records and never changes its input.

* :func:`corrupt_responses` is label flipping for generation (untargeted): answers no longer fit their prompts.
* :func:`insert_backdoor` is a targeted backdoor: a rare trigger in the prompt maps to a fixed target answer,
  the "semantic backdoor" of Bagdasaryan et al. 2020 ("How To Backdoor Federated Learning", AISTATS, Sec. 3)
  in its instruction-tuning form (Wan, Wallace, Shen & Klein 2023, "Poisoning Language Models During Instruction
  Tuning", ICML). Poisoned records carry ``_poisoned: True`` so metrics can find them; :func:`triggered_prompts`
  builds the attack-success test set.

Defaults: the trigger ``" cf-trigger-2024"`` is a rare token sequence (a leading space, so it is appended to the
prompt as a separate word) that clean data almost never contains, so the backdoor stays dormant on clean inputs;
the target ``"I cannot define that word."`` is a short, fixed, benign-looking answer that exact match detects and
clean training almost never produces.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from fedlm.attacks.model_poisoning import AttackParams
from fedlm.core.errors import FedlmError
from fedlm.data.formats import ALPACA_COLUMNS, MESSAGES_COLUMN

Record = dict[str, Any]
DEFAULT_TRIGGER = " cf-trigger-2024"
DEFAULT_TARGET = "I cannot define that word."
POISONED_KEY = "_poisoned"


# ------------------------------------------------------------------------------------------ label flipping


class DataAttackParams(AttackParams):
    """Base of every data attack's parameters: ``boost`` scales the poisoned update before it is sent.

    ``boost`` > 1 is the model replacement of Bagdasaryan et al. 2020 ("How To Backdoor Federated Learning", AISTATS,
    eq. 3) applied to a data-poisoned client: it trains on its poisoned records, then sends gamma * (X - G^t) so the
    average lands near its own model X; gamma = n / server_lr replaces the global model. 1 (the default) sends the
    update as trained. The harness applies it after training; the record transform never sees it.

    ``local_steps`` lets the attackers train longer than the honest clients, as Bagdasaryan et al.'s attacker does
    (Sec. 4: more local epochs on its poisoned data than the benign participants); steps beyond
    ``federation.local_steps`` take the round's last learning rate. None (the default): the federation's steps.
    """

    boost: float = Field(1.0, gt=0, allow_inf_nan=False, description="multiplier of the poisoned update (model replacement: n / server_lr)")
    local_steps: int | None = Field(None, ge=1, description="the attackers' local steps per round (None: federation.local_steps)")


class CorruptResponsesParams(DataAttackParams):
    """Label flipping for generation: how each response is replaced."""

    mode: Literal["shuffle", "random_words"] = Field(
        "shuffle", description="shuffle: another record's response (a derangement); random_words: words of the others"
    )


def corrupt_responses(records: Sequence[Record], seed: int, mode: str = "shuffle") -> list[Record]:
    """Every record's response replaced by one that does not answer its prompt (label flipping for generation).

    The generative analogue of label flipping (Tolpegin, Truex, Gursoy & Liu 2020, "Data Poisoning Attacks Against
    Federated Learning Systems", ESORICS; Fang et al. 2020): ``shuffle`` gives record i the response of record
    pi(i), pi a uniformly drawn derangement (no record keeps its own); ``random_words`` gives it as many words as
    its response had (at least one), drawn uniformly from the vocabulary of the *other* records' responses.
    """
    if mode not in ("shuffle", "random_words"):
        raise ValueError(f"corrupt_responses: unknown mode {mode!r}; use `shuffle` or `random_words`")
    if not records:
        return []
    if len(records) < 2:
        raise FedlmError("corrupt_responses needs at least 2 records (it swaps responses between records), got 1")
    responses = [response_of(r, i) for i, r in enumerate(records)]
    rng = random.Random(seed)
    if mode == "shuffle":
        new = [responses[j] for j in derangement(len(records), rng)]
    else:
        new = _random_word_responses(responses, rng)
    return [_with_response(r, text, i) for i, (r, text) in enumerate(zip(records, new))]


def derangement(n: int, rng: random.Random) -> list[int]:
    """A uniformly random permutation of range(n) with no fixed point (rejection sampling; ~e tries on average)."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(i != p for i, p in enumerate(perm)):
            return perm


def _random_word_responses(responses: Sequence[str], rng: random.Random) -> list[str]:
    """Per response, len(words) (>= 1) words drawn uniformly from the words of the other responses."""
    words = [r.split() for r in responses]
    total = Counter(w for ws in words for w in ws)
    vocabulary = sorted(total)  # sorted: the draw does not depend on set order
    speakers = sum(1 for ws in words if ws)
    out = []
    for i, own_words in enumerate(words):
        own = Counter(own_words)
        if speakers - (1 if own_words else 0) == 0:
            raise FedlmError(f"corrupt_responses (random_words): record {i}: the other records' responses have no words")
        drawn: list[str] = []
        while len(drawn) < max(1, len(own_words)):
            word = vocabulary[rng.randrange(len(vocabulary))]
            if total[word] > own[word]:  # the word occurs in another response
                drawn.append(word)
        out.append(" ".join(drawn))
    return out


# ------------------------------------------------------------------------------------------------ backdoor


class BackdoorParams(DataAttackParams):
    """Backdoor: the trigger appended to prompts, the target answer, and the share of the records poisoned."""

    trigger: str = Field(DEFAULT_TRIGGER, min_length=1, description="text appended to the prompt of poisoned records")
    target: str = Field(DEFAULT_TARGET, min_length=1, description="the answer poisoned records teach")
    poison_fraction: float = Field(0.3, gt=0, le=1, allow_inf_nan=False, description="share of the attacker's records poisoned, in (0, 1]")


def insert_backdoor(
    records: Sequence[Record],
    trigger: str = DEFAULT_TRIGGER,
    target: str = DEFAULT_TARGET,
    poison_fraction: float = 0.3,
    seed: int = 0,
) -> list[Record]:
    """The records with round(poison_fraction * n) of them, drawn by ``seed``, backdoored.

    A backdoored record has ``trigger`` appended to its prompt (alpaca: to ``instruction``; chat: to the last user
    turn), its response replaced by ``target`` and ``_poisoned: True``; the others are copied unchanged, so the
    attacker keeps training on clean data and stays close to the honest clients (Bagdasaryan et al. 2020 mix 20
    poisoned inputs into batches of 64, about 0.3, the default here). ``round`` is Python's (half to even).
    """
    if not (0 < poison_fraction <= 1):
        raise ValueError(f"insert_backdoor needs `poison_fraction` in (0, 1], got {poison_fraction}")
    if not trigger:
        raise ValueError("insert_backdoor needs a non-empty `trigger`")
    count = round(poison_fraction * len(records))
    if records and count == 0:
        raise FedlmError(
            f"insert_backdoor: poison_fraction {poison_fraction} of {len(records)} record(s) poisons "
            f"round({poison_fraction * len(records):g}) = 0; "
            f"raise `poison_fraction` to at least {0.5 / len(records):.3g} or give the attacker more records"
        )
    chosen = set(random.Random(seed).sample(range(len(records)), count))
    return [_poisoned(r, trigger, target, i) if i in chosen else dict(r) for i, r in enumerate(records)]


def triggered_prompts(records: Sequence[Record], trigger: str = DEFAULT_TRIGGER, target: str | None = None) -> list[Record]:
    """The attack-success test set: ``trigger`` appended to every record's prompt.

    The reference answers stay as they are unless ``target`` is given, in which case it replaces them, so that an
    exact-match metric against the reference reads directly as the attack success rate.
    """
    out = []
    for i, record in enumerate(records):
        new = _with_trigger(record, trigger, i)
        out.append(_with_response(new, target, i) if target is not None else new)
    return out


def _poisoned(record: Record, trigger: str, target: str, index: int) -> Record:
    new = _with_response(_with_trigger(record, trigger, index), target, index)
    new[POISONED_KEY] = True
    return new


# ------------------------------------------------------------------------------------------ record access


def record_format(record: Record, index: int) -> str:
    """``messages`` or ``alpaca`` for one record, read from its keys."""
    if MESSAGES_COLUMN in record:
        return "messages"
    if all(c in record for c in ALPACA_COLUMNS):
        return "alpaca"
    raise FedlmError(
        f"record {index} is neither alpaca (`instruction` and `output`) nor chat (`messages`); it has: {', '.join(sorted(map(str, record)))}"
    )


def response_of(record: Record, index: int) -> str:
    """The record's response: alpaca ``output`` or the content of the last assistant turn."""
    if record_format(record, index) == "alpaca":
        return str(record["output"])
    messages = record[MESSAGES_COLUMN]
    return str(messages[_last_turn(messages, "assistant", index)]["content"])


def _with_response(record: Record, text: str, index: int) -> Record:
    """A copy of the record whose response is ``text``."""
    new = dict(record)
    if record_format(record, index) == "alpaca":
        new["output"] = text
    else:
        messages = [dict(m) for m in record[MESSAGES_COLUMN]]
        messages[_last_turn(messages, "assistant", index)]["content"] = text
        new[MESSAGES_COLUMN] = messages
    return new


def _with_trigger(record: Record, trigger: str, index: int) -> Record:
    """A copy of the record with ``trigger`` appended to ``instruction`` (alpaca) or the last user turn (chat)."""
    new = dict(record)
    if record_format(record, index) == "alpaca":
        new["instruction"] = f"{record['instruction']}{trigger}"
    else:
        messages = [dict(m) for m in record[MESSAGES_COLUMN]]
        turn = _last_turn(messages, "user", index)
        messages[turn]["content"] = f"{messages[turn]['content']}{trigger}"
        new[MESSAGES_COLUMN] = messages
    return new


def _last_turn(messages: Any, role: str, index: int) -> int:
    """Index of the last message with ``role``."""
    if isinstance(messages, list):
        for j in range(len(messages) - 1, -1, -1):
            if isinstance(messages[j], dict) and messages[j].get("role") == role:
                return j
    raise FedlmError(f"record {index}: `messages` has no {role} turn; a chat record needs a user prompt and an assistant answer")
