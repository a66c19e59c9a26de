"""The one module of cross-section rules: its shape (one documented function per rule, one entry point each for load
time and for the real federation), and the rules that need the real client names."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest

from fedlm.aggregation.base import registered_aggregators
from fedlm.config import rules
from fedlm.config.io import validate_config
from fedlm.config.rules import FEDERATION_RULES, LOAD_RULES, check_federation
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError

SRC = Path(rules.__file__).resolve().parents[2]  # src/fedlm (rules is the package config/rules/)


def _config(**sections: dict[str, Any]) -> ExperimentConfig:
    return ExperimentConfig.model_validate({"partition": {"method": "by_field", "field": "domain"}, **sections})


@pytest.mark.parametrize("rule", LOAD_RULES + FEDERATION_RULES, ids=lambda r: r.__name__)
def test_every_rule_is_a_small_function_that_gives_its_reason(rule) -> None:
    assert inspect.getmodule(rule).__name__.startswith(rules.__name__ + ".")  # one module of the rules package
    assert rule.__doc__ and len(rule.__doc__.split()) >= 5, f"{rule.__name__} must say why it refuses"
    assert len(inspect.getsource(rule).splitlines()) <= 40


def test_every_rule_of_the_package_is_run() -> None:
    import importlib
    import pkgutil

    modules = [importlib.import_module(f"{rules.__name__}.{m.name}") for m in pkgutil.iter_modules(rules.__path__)]
    assert len(modules) >= 8
    defined = {
        name
        for module in modules
        for name, fn in inspect.getmembers(module, inspect.isfunction)
        if fn.__module__ == module.__name__ and inspect.signature(fn).parameters.keys() == {"s"}
    }
    assert defined == {r.__name__ for r in LOAD_RULES + FEDERATION_RULES}


def test_no_aggregator_name_is_spelled_outside_the_aggregation_package() -> None:
    """Other packages ask a capability; only the schema's default (`fedavg`) names an aggregator."""
    names = set(registered_aggregators())
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if "aggregation" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {node.value!r}")
    assert len(found) == 1 and found[0].startswith("config/schema/") and found[0].endswith(" 'fedavg'"), found


@pytest.mark.parametrize(
    "sections, names, fine, message",
    [
        ({"federation": {"clients_per_round": 4}}, "abc", "abcd", "`federation.clients_per_round` must be <= the number of clients (3), got 4"),
        ({"peft": {"client_ranks": [2, 4]}}, "abc", "ab", "`peft.client_ranks` has 2 entries but the federation has 3 clients"),
        ({"peft": {"client_ranks": {"z": 2}}}, "ab", "abz", "`peft.client_ranks` names unknown clients ['z']"),
        ({"eval": {"audit": {"canary_client": "z"}}}, "ab", "abz", "`eval.audit.canary_client` 'z' is not a client"),
        ({"attack": {"name": "sign_flip", "clients": ["a", "b"]}, "aggregation": {"name": "median"}}, "abcd", "abcde", "K > 2f = 4"),
        ({"attack": {"name": "sign_flip", "clients": ["a"]}, "aggregation": {"name": "krum"}}, "abcd", "abcde", "K > 2f + 2 = 4"),
        ({"privacy": {"secure_aggregation": {"threshold": 5}}}, "abcd", "abcdefg", "above the clients per round (4)"),
    ],
)
def test_the_real_federation_is_checked_once_the_clients_are_known(sections: dict, names: str, fine: str, message: str) -> None:
    config = _config(**sections)
    with pytest.raises(FedlmError) as refused:
        check_federation(config, list(names))
    assert message in str(refused.value)
    check_federation(config, list(fine))


def test_validate_config_runs_the_rules() -> None:
    raw = {"partition": {"method": "iid", "num_clients": 6, "field": None}, "federation": {"clients_per_round": 8}}
    with pytest.raises(FedlmError, match=r"`federation.clients_per_round` must be <= `partition.num_clients` \(6\), got 8"):
        validate_config(raw)
    assert ExperimentConfig.model_validate(raw).federation.clients_per_round == 8  # the schema alone judges sections
