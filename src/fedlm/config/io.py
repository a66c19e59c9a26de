"""Loading the experiment config from YAML, applying ``--set a.b=value`` overrides, saving it resolved."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a YAML config (or the embedded defaults when ``path`` is None), apply overrides, validate.

    Raises:
        FedlmError: the file is missing or not YAML, an override is malformed, or a field is invalid.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FedlmError(f"config file {str(path)!r} does not exist; pass the path of a YAML file")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise FedlmError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise FedlmError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw)


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping into an :class:`ExperimentConfig`, with one readable line per problem: each section
    against its schema, then the cross-section rules (:func:`fedlm.config.rules.check_config`)."""
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise FedlmError(format_validation_error(exc)) from None
    from fedlm.config.rules import check_config  # noqa: PLC0415 - the registries import torch: load lazily

    check_config(config)
    return config


def format_validation_error(exc: ValidationError) -> str:
    """Turn pydantic's report into lines like "`federation.rounds`: Input should be greater than or equal to 1"."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"`{loc}` is not a known config key; {_spelling_hint(err['loc'])}")
        elif loc:
            lines.append(f"`{loc}`: {err['msg']} (got {err.get('input')!r})")
        else:
            lines.append(err["msg"].removeprefix("Value error, "))
    return "invalid config: " + "; ".join(lines)


def _spelling_hint(loc: Sequence[int | str]) -> str:
    """``did you mean `federation.rounds`?`` for the known key closest to an unknown one, else the generic advice."""
    section: type[BaseModel] | None = ExperimentConfig
    for part in loc[:-1]:
        field = section.model_fields.get(str(part)) if section is not None else None
        section = _section_type(field.annotation) if field is not None else None
    if section is not None:
        close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
        if close:
            prefix = ".".join(str(p) for p in loc[:-1])
            return f"did you mean `{prefix + '.' if prefix else ''}{close[0]}`?"
    return "remove it or check its spelling"


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The config section class an annotation holds (``X``, ``X | None``), or None for a plain value."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in the nested mapping ``raw``; the value is parsed as YAML (``8``, ``true``, ``[a, b]``)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise FedlmError(f"override {item!r} must look like section.key=value, e.g. federation.rounds=5")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FedlmError(f"override {item!r}: `{part}` is a value, not a section")
        node = child
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if parts[-1] == "name" and value is not None:
        value = str(value)
    node[parts[-1]] = value


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as plain data, every default filled in (aggregator parameters kept)."""
    return config.model_dump(mode="json")


def save_config(config: ExperimentConfig, path: Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal config)."""
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def flatten_keys(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as ``{"section.key": value}`` (what --resume and the Flower config hash compare)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out
