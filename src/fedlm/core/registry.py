"""One small registry of named components (aggregators, objectives, attacks, LoRA modes).

A registry maps the name a user writes in the config (``aggregation.name: fedadam``) to what builds it. Built-in
components register themselves when their module is imported; the registry imports those modules (given by dotted
path, so this module imports nothing of fedlm) the first time it is asked. An unknown name is a
:class:`~fedlm.core.errors.FedlmError` that names the config field and lists the valid names; registering a second,
different component under a taken name is refused.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar, overload

from fedlm.core.errors import FedlmError

T = TypeVar("T")


class Registry(Generic[T]):
    """Components of one kind by name.

    Args:
        kind: What the components are, for messages (``"aggregator"``).
        field: The config field that names one (``"aggregation.name"``), for the unknown-name error.
        builtin: Dotted module paths imported on first use; importing them registers the built-in components.
    """

    def __init__(self, kind: str, field: str, builtin: Sequence[str] = ()) -> None:
        self.kind = kind
        self.field = field
        self._builtin = tuple(builtin)
        self._items: dict[str, T] = {}
        self._loaded = not self._builtin

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, item: T) -> T: ...

    def register(self, name: str, item: Any = None) -> Any:
        """Register ``item`` as ``name``; without ``item``, a decorator that registers what it decorates."""
        if item is None:
            return lambda decorated: self.register(name, decorated)
        existing = self._items.get(name)
        if existing is not None and existing is not item:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({existing!r} and {item!r}); choose another name")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        """The component registered as ``name``; an unknown name is a FedlmError naming the field and the valid names."""
        self._load_builtin()
        if name not in self._items:
            raise FedlmError(f"`{self.field}` {name!r} is unknown; valid: {', '.join(self.names())}")
        return self._items[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the component registered as ``name`` (a class or factory) with ``args`` and ``kwargs``."""
        factory = self.get(name)
        if not callable(factory):
            raise TypeError(f"{self.kind} {name!r} is registered as {factory!r}, which cannot be called to build one")
        return factory(*args, **kwargs)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load_builtin()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, component)`` pairs, sorted by name."""
        return [(name, self._items[name]) for name in self.names()]

    def values(self) -> list[T]:
        """The components, sorted by name."""
        return [item for _, item in self.items()]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        self._load_builtin()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.field!r}, names={list(self._items)})"

    def _load_builtin(self) -> None:
        """Import the built-in modules once, so that they register themselves."""
        if self._loaded:
            return
        self._loaded = True  # set first: the modules call back into register while they load
        try:
            for module in self._builtin:
                importlib.import_module(module)
        except BaseException:
            self._loaded = False
            raise
