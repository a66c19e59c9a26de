"""Multiple-choice test records: ``choices`` (two or more strings) and ``label`` (the index of the right one), scored
by :mod:`fedlm.evaluation.multiple_choice`."""

from __future__ import annotations

from typing import Any

from fedlm.core.errors import FedlmError

CHOICES, LABEL = "choices", "label"


def check_choices(record: dict[str, Any], where: str) -> None:
    """Refuse a record whose ``choices``/``label`` cannot be a question (no-op for records without ``choices``)."""
    if CHOICES not in record:
        return
    choices, label = record[CHOICES], record.get(LABEL)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise FedlmError(f"{where}: `choices` must be a list of two or more non-empty strings, got {choices!r}")
    if type(label) is not int or not 0 <= label < len(choices):
        raise FedlmError(f"{where}: `label` must be the index (0..{len(choices) - 1}) of the right choice, got {label!r}")
