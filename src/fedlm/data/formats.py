"""Record formats (Alpaca and chat ``messages``) turned into one conversation shape: a list of messages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedlm.core.errors import FedlmError

Message = dict[str, str]
ALPACA_COLUMNS = ("instruction", "output")
MESSAGES_COLUMN = "messages"
_ROLES = ("system", "user", "assistant")


def detect_format(records: Sequence[dict[str, Any]], requested: str, field_name: str) -> str:
    """Return ``alpaca`` or ``messages``; ``requested`` is ``data.format`` (auto | alpaca | messages)."""
    columns = set(records[0])
    if requested == "auto":
        if MESSAGES_COLUMN in columns:
            return "messages"
        if all(c in columns for c in ALPACA_COLUMNS):
            return "alpaca"
        raise FedlmError(
            f"`{field_name}`: cannot tell the format; the data needs columns `instruction` and `output` (alpaca, "
            f"`input` optional) or `messages` (chat); it has: {', '.join(sorted(columns))}"
        )
    needed = ALPACA_COLUMNS if requested == "alpaca" else (MESSAGES_COLUMN,)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise FedlmError(
            f"`{field_name}` is `data.format: {requested}` but lacks column(s) {', '.join(missing)}; it has: {', '.join(sorted(columns))}"
        )
    return requested


def to_messages(record: dict[str, Any], fmt: str, system_prompt: str | None, where: str) -> list[Message]:
    """One record as a conversation ending with the assistant's answer (the part the loss covers)."""
    if fmt == "alpaca":
        prompt = str(record["instruction"]).strip()
        extra = str(record.get("input") or "").strip()
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"])}]
    else:
        messages = _checked_messages(record[MESSAGES_COLUMN], where)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def prompt_and_reference(messages: list[Message]) -> tuple[list[Message], str]:
    """Split a conversation into the prompt (everything before the last answer) and that answer."""
    return messages[:-1], messages[-1]["content"]


def _checked_messages(value: Any, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise FedlmError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    messages = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get("role") not in _ROLES or not isinstance(turn.get("content"), str):
            raise FedlmError(f"{where}: each message needs `role` (system|user|assistant) and string `content`, got {turn!r}")
        messages.append({"role": turn["role"], "content": turn["content"]})
    if messages[-1]["role"] != "assistant":
        raise FedlmError(f"{where}: the last message must be the assistant's answer (role assistant)")
    return messages
