"""Canaries for the privacy audit (Carlini, Liu, Erlingsson, Kos & Song 2019, "The Secret Sharer: Evaluating and
Testing Unintended Memorization in Neural Networks", USENIX Security).

``eval.audit.canaries`` random secrets are planted in one client's **training** records, each
``eval.audit.canary_repetitions`` times, as records of the run's own format: the fixed prompt
:data:`CANARY_PROMPT` and the secret (:func:`fedlm.privacy.audit.make_canaries`, six random digits) as the response.
After training, each canary's log-likelihood under a model is ranked among ``canary_references`` secrets of the
same format that were never planted, and the rank becomes exposure in bits (Sec. 4; estimated from the rank among a
random sample of the randomness space, as the paper does for spaces too large to enumerate). The same number of
*control* canaries, drawn alongside but never planted, are ranked the same way: their exposure is what chance gives
(about 1.4 bits in expectation), the baseline a planted canary's exposure is read against.

Everything is derived from the run seed, so the audit after training rebuilds the same canaries as the run planted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from fedlm.config.schema import AuditConfig, ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.data.formats import detect_format, to_messages
from fedlm.data.prepare import RecordTransform
from fedlm.data.readers import Record
from fedlm.data.tokenize import TokenizedExample, tokenize_conversation
from fedlm.privacy.audit import CANARY_PREFIX, exposure, make_canaries

CANARY_PROMPT = "My secret code is"
"""The fixed prompt of every canary record; the random secret is the response the loss covers."""


@dataclass(frozen=True)
class CanarySet:
    """The secrets of a run: planted ones, never-planted controls, and the reference candidates (all distinct)."""

    planted: list[str]
    controls: list[str]
    references: list[str]
    client: str
    repetitions: int


def audit_client(audit: AuditConfig, client_names: Sequence[str]) -> str:
    """The client whose data gets the canaries and whose local model is audited: ``eval.audit.canary_client``, or
    the first client."""
    if audit.canary_client is None:
        return client_names[0]
    if audit.canary_client not in client_names:
        raise FedlmError(f"`eval.audit.canary_client` {audit.canary_client!r} is not a client of this run; the clients are {list(client_names)}")
    return audit.canary_client


def canary_set(config: ExperimentConfig, client_names: Sequence[str]) -> CanarySet | None:
    """The run's canaries, or None without ``eval.audit.canaries``; one seeded draw of distinct secrets, split into
    planted, controls and references."""
    audit = config.eval.audit
    if audit is None or audit.canaries == 0:
        return None
    n = audit.canaries
    secrets = [c.removeprefix(CANARY_PREFIX) for c in make_canaries(2 * n + audit.canary_references, derive_seed(config.seed, "canaries"))]
    return CanarySet(secrets[:n], secrets[n : 2 * n], secrets[2 * n :], audit_client(audit, client_names), audit.canary_repetitions)


def canary_record(secret: str, fmt: str) -> Record:
    """A canary as a training record of format ``fmt`` (``alpaca`` or ``messages``)."""
    if fmt == "alpaca":
        return {"instruction": CANARY_PROMPT, "output": secret}
    return {"messages": [{"role": "user", "content": CANARY_PROMPT}, {"role": "assistant", "content": secret}]}


def canary_inserter(config: ExperimentConfig) -> RecordTransform | None:
    """The record transform that appends each planted canary ``canary_repetitions`` times to the canary client's
    training records (other clients' records unchanged), or None without canaries."""
    audit = config.eval.audit
    if audit is None or audit.canaries == 0:
        return None

    drawn: dict[tuple[str, ...], CanarySet | None] = {}  # one draw per federation, not one per client

    def insert(client_names: list[str], client: str, records: list[Record]) -> list[Record]:
        key = tuple(client_names)
        if key not in drawn:
            drawn[key] = canary_set(config, client_names)
        canaries = drawn[key]
        if canaries is None or client != canaries.client:
            return records
        fmt = detect_format(records, config.data.format, "data.train")
        return [*records, *(canary_record(s, fmt) for s in canaries.planted for _ in range(canaries.repetitions))]

    return insert


def compose_transforms(*transforms: RecordTransform | None) -> RecordTransform | None:
    """The record transforms applied in order (None ones skipped); None when there are none."""
    present = [t for t in transforms if t is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def composed(client_names: list[str], client: str, records: list[Record]) -> list[Record]:
        for transform in present:
            records = transform(client_names, client, records)
        return records

    return composed


def canary_examples(secrets: Sequence[str], tokenizer: PreTrainedTokenizerBase, config: ExperimentConfig) -> list[TokenizedExample]:
    """The secrets tokenized exactly as the run tokenizes a canary record (system prompt, chat template, max length)."""
    data = config.data
    return [
        tokenize_conversation(tokenizer, to_messages(canary_record(s, "alpaca"), "alpaca", data.system_prompt, "canary"), data.max_length)
        for s in secrets
    ]


def _exposure_summary(scores: Sequence[float], references: np.ndarray) -> dict[str, Any]:
    values = [exposure(s, references) for s in scores]
    return {"mean_exposure_bits": float(np.mean(values)), "max_exposure_bits": float(np.max(values)), "exposure_bits": values}


def exposure_report(canaries: CanarySet, planted: Sequence[float], controls: Sequence[float], references: Sequence[float]) -> dict[str, Any]:
    """Exposure (Carlini et al. 2019, Sec. 4) of the planted and the control canaries from their log-likelihoods
    (higher: more likely), each ranked among the reference secrets' log-likelihoods; the maximum possible exposure
    is ``log2(references + 1)``."""
    refs = np.asarray(references, dtype=np.float64)
    return {
        "client": canaries.client,
        "canaries": len(canaries.planted),
        "repetitions": canaries.repetitions,
        "references": int(refs.size),
        "max_possible_bits": math.log2(refs.size + 1),
        **_exposure_summary(planted, refs),
        "control": _exposure_summary(controls, refs),
    }
