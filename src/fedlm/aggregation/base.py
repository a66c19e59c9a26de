"""The aggregator contract and the registry of aggregators by name.

An aggregator turns the current global trainable tensors and the round's accepted client updates (deltas) into
the next global tensors. Math lives in pure functions in each algorithm's file; the class only adapts the
contract and keeps state (``state_dict``/``load_state_dict``, saved in every checkpoint).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from fedlm.errors import FedlmError
from fedlm.federation.update import ClientUpdate, TensorDict


class AggregatorParams(BaseModel):
    """Parameters of an aggregator, given beside ``aggregation.name``; subclasses add fields."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class AggregationResult:
    """The next global tensors and what the server should log about this step."""

    params: TensorDict
    metrics: dict[str, float] = field(default_factory=dict)


class TrainerHook:
    """Client-side part of an algorithm (e.g. FedProx's proximal term), run by the client trainer.

    Hooks let an algorithm change local training without copying the trainer. The default does nothing.
    """

    def extra_loss(self, params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """A term added to the local loss at every step (None: nothing)."""
        return None


class Aggregator(ABC):
    """Base class of every server aggregator."""

    name: ClassVar[str]
    Params: ClassVar[type[AggregatorParams]] = AggregatorParams

    def __init__(self, params: AggregatorParams) -> None:
        self.params = params

    @abstractmethod
    def aggregate(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> AggregationResult:
        """The next global tensors from the current ones and a non-empty list of accepted updates."""

    def trainer_hooks(self) -> list[TrainerHook]:
        """Client-side hooks this algorithm needs (none for plain averaging)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Server state to checkpoint (momentum buffers, moments, ...); empty for stateless algorithms."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"aggregator {self.name!r} is stateless but got state keys {sorted(state)}")


_REGISTRY: dict[str, type[Aggregator]] = {}


def register_aggregator(name: str) -> Callable[[type[Aggregator]], type[Aggregator]]:
    """Class decorator: make an aggregator available as ``aggregation.name: <name>``."""

    def decorate(cls: type[Aggregator]) -> type[Aggregator]:
        if name in _REGISTRY:
            raise ValueError(f"aggregator {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_aggregators() -> list[str]:
    """Names of every registered aggregator, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def build_aggregator(name: str, params: Mapping[str, Any]) -> Aggregator:
    """Instantiate the aggregator ``name`` with its parameters, refusing unknown names and parameters."""
    _load_builtin()
    if name not in _REGISTRY:
        raise FedlmError(f"`aggregation.name` {name!r} is unknown; valid: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    try:
        parsed = cls.Params.model_validate(dict(params))
    except ValidationError as exc:
        problems = "; ".join(
            f"`aggregation.{'.'.join(map(str, e['loc']))}`: "
            + ("not a parameter of this aggregator" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        )
        raise FedlmError(f"aggregator {name!r}: {problems}") from None
    return cls(parsed)


def _load_builtin() -> None:
    """Import the built-in algorithm modules so that they register themselves."""
    from fedlm.aggregation import fedavg  # noqa: F401
