"""Validating the parameters of a registered component (an aggregator, an attack) with one readable error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fedlm.core.errors import FedlmError

ParamsT = TypeVar("ParamsT", bound=BaseModel)


def validate_params(model: type[ParamsT], params: Mapping[str, Any], section: str, kind: str, name: str) -> ParamsT:
    """``model`` from ``params``, or a FedlmError naming each bad field as ``<section>.<field>``.

    ``kind`` and ``name`` say whose parameters they are, e.g. ("aggregator", "fedadam").
    """
    try:
        return model.model_validate(dict(params))
    except ValidationError as exc:
        problems = "; ".join(
            f"`{'.'.join([section, *map(str, e['loc'])])}`: " + (f"not a parameter of this {kind}" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        )
        raise FedlmError(f"{kind} {name!r}: {problems}") from None
