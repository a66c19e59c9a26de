"""The one generic registry: names, lookup, the unknown-name error, duplicates, lazy loading; and its four users."""

from __future__ import annotations

import sys
import types

import pytest

from fedlm.aggregation.base import AGGREGATORS, Aggregator
from fedlm.aggregation.lora import LORA_MODES
from fedlm.attacks import ATTACKS
from fedlm.core.errors import FedlmError
from fedlm.core.registry import Registry
from fedlm.objectives.base import OBJECTIVES


def test_names_are_sorted_and_lookup_returns_what_was_registered() -> None:
    colours: Registry[int] = Registry("colour", "paint.name")
    colours.register("red", 1)

    @colours.register("blue")
    def blue() -> str:
        return "b"

    assert colours.names() == ["blue", "red"] == list(colours)
    assert colours.get("red") == 1 and colours["blue"] is blue and colours.build("blue") == "b"
    assert "red" in colours and "green" not in colours and len(colours) == 2
    assert colours.items() == [("blue", blue), ("red", 1)] and colours.values() == [blue, 1]


def test_an_unknown_name_names_the_field_and_lists_the_valid_ones() -> None:
    colours: Registry[int] = Registry("colour", "paint.name")
    colours.register("red", 1)
    colours.register("blue", 2)
    with pytest.raises(FedlmError, match=r"^`paint.name` 'green' is unknown; valid: blue, red$"):
        colours.get("green")
    with pytest.raises(FedlmError, match="valid: blue, red"):
        colours["green"]


def test_a_second_component_under_a_taken_name_is_refused() -> None:
    colours: Registry[object] = Registry("colour", "paint.name")
    first = object()
    colours.register("red", first)
    colours.register("red", first)  # the same object again (a module imported twice) is harmless
    with pytest.raises(ValueError, match="colour 'red' is registered twice"):
        colours.register("red", object())
    assert colours.get("red") is first


def test_builtin_modules_are_imported_on_first_use_only(monkeypatch: pytest.MonkeyPatch) -> None:
    colours: Registry[int] = Registry("colour", "paint.name", builtin=["fedlm_test_fake_colours"])
    imported: list[str] = []

    def fake_import(name: str) -> types.ModuleType:
        imported.append(name)
        colours.register("red", 1)  # what a built-in module does when it is imported
        return types.ModuleType(name)

    monkeypatch.setattr("importlib.import_module", fake_import)
    assert imported == []
    assert colours.names() == ["red"] and colours.get("red") == 1
    assert imported == ["fedlm_test_fake_colours"]  # once
    assert "fedlm_test_fake_colours" not in sys.modules


def test_the_four_registries_share_the_one_shape() -> None:
    assert {"fedavg", "krum", "scaffold"} <= set(AGGREGATORS.names())
    assert all(issubclass(cls, Aggregator) and cls.name == name for name, cls in AGGREGATORS.items())
    assert OBJECTIVES.names() == ["clm", "dpo", "sft"]
    assert LORA_MODES.names() == ["exact", "fedex", "ffa", "flora", "naive", "rolora"]
    assert {"sign_flip", "backdoor", "alie"} <= set(ATTACKS.names())
    for registry, field in (
        (AGGREGATORS, "aggregation.name"),
        (OBJECTIVES, "objective.name"),
        (LORA_MODES, "aggregation.lora"),
        (ATTACKS, "attack.name"),
    ):
        with pytest.raises(FedlmError, match=rf"`{field}` 'nope' is unknown; valid: {registry.names()[0]}, "):
            registry.get("nope")
