"""Opening a run for the CLI's ``generate`` and ``chat``: the run, its ``inference`` settings with the command line's
overrides, the checked mix; and the prompts file of ``fedlm generate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedlm.config.io import format_validation_error
from fedlm.config.schema.inference import InferenceConfig
from fedlm.core.errors import FedlmError
from fedlm.data.formats import Message
from fedlm.inference.mix import MixedModel, MixSpec
from fedlm.inference.run import open_run


def inference_settings(base: InferenceConfig, **overrides: Any) -> InferenceConfig:
    """``base`` with the command line's values (None: keep); ``--weight`` is a number or ``auto``."""
    values = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(values.get("weight"), str) and values["weight"] != "auto":
        try:
            values["weight"] = float(values["weight"])
        except ValueError:
            raise FedlmError(f"--weight must be a number in [0, 1] or `auto`, got {values['weight']!r}") from None
    try:
        return InferenceConfig.model_validate({**base.model_dump(), **values})
    except ValidationError as exc:
        raise FedlmError(format_validation_error(exc).replace("invalid config: `", "invalid option: `inference.")) from None


def open_mixed(run_dir: Path, client: str | None, **overrides: Any) -> tuple[MixedModel, MixSpec, InferenceConfig]:
    """Open ``run_dir``, resolve its mix for ``client`` and check it (a refusal names the client and the fix)."""
    mixed = MixedModel(open_run(run_dir))
    settings = inference_settings(mixed.run.config.inference, **overrides)
    spec = MixSpec.from_config(settings, client)
    if client is not None and spec.mix == "global":
        mixed.run.client(client)  # an unknown client is an error even for the global model
    mixed.check(spec)
    return mixed, spec, settings


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """The lines of a prompts JSONL file: each an object with ``prompt`` (a user message, through the chat template),
    ``messages`` (a conversation) or ``text`` (raw text to continue); other keys are copied to the answer."""
    if not path.is_file():
        raise FedlmError(f"--prompts: {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FedlmError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or sum(k in row for k in ("prompt", "messages", "text")) != 1:
            raise FedlmError(f"{path}:{number}: each line must be an object with exactly one of `prompt`, `messages` or `text`")
        rows.append(row)
    if not rows:
        raise FedlmError(f"--prompts: {path} holds no prompts")
    return rows


def row_messages(row: dict[str, Any]) -> list[Message] | None:
    """The conversation of a prompts row (None for a raw ``text`` row)."""
    if "text" in row:
        return None
    if "prompt" in row:
        return [{"role": "user", "content": str(row["prompt"])}]
    messages = row["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise FedlmError("`messages` must be a list of {role, content} objects")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
