"""Config loading and validation: every error names the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlm.config.io import apply_override, load_config, save_config
from fedlm.core.errors import FedlmError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_load_without_a_file() -> None:
    config = load_config(None)
    assert config.model.name == "smollm2-135m-instruct"
    assert config.aggregation.name == "fedavg"
    assert config.objective.name == "sft"


def test_unknown_key_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(FedlmError, match=r"`federation.round` is not a known config key"):
        load_config(_write(tmp_path, "federation:\n  round: 3\n"))


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FedlmError, match=r"`federaton` is not a known config key"):
        load_config(_write(tmp_path, "federaton: {}\n"))


def test_bad_value_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(FedlmError, match=r"`federation.rounds`.*greater than or equal to 1"):
        load_config(_write(tmp_path, "federation:\n  rounds: 0\n"))


def test_clients_per_round_above_num_clients(tmp_path: Path) -> None:
    text = "partition: {method: iid, num_clients: 6}\nfederation: {clients_per_round: 8}\n"
    with pytest.raises(FedlmError, match=r"`federation.clients_per_round` must be <= `partition.num_clients` \(6\), got 8"):
        load_config(_write(tmp_path, text))


def test_num_clients_required_for_iid(tmp_path: Path) -> None:
    with pytest.raises(FedlmError, match=r"`partition.num_clients` is required"):
        load_config(_write(tmp_path, "partition: {method: iid}\n"))


def test_bad_literal_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(FedlmError, match=r"`model.dtype`.*'auto', 'float32' or 'bfloat16'"):
        load_config(_write(tmp_path, "model: {dtype: float16}\n"))


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(FedlmError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(FedlmError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: [\n"))


def test_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    path = _write(tmp_path, "federation: {rounds: 2}\n")
    config = load_config(path, ["federation.rounds=5", "peft.target_modules=[q_proj, v_proj]", "aggregation.name=fedavg"])
    assert config.federation.rounds == 5
    assert config.peft.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(FedlmError, match="section.key=value"):
        load_config(path, ["federation.rounds"])


def test_override_into_a_value_is_refused() -> None:
    raw = {"seed": 1}
    with pytest.raises(FedlmError, match="`seed` is a value"):
        apply_override(raw, "seed.x=2")


def test_objective_accepts_a_bare_string(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "objective: sft\n")).objective.name == "sft"
    assert load_config(_write(tmp_path, "objective: dpo\n")).objective.name == "dpo"
    with pytest.raises(FedlmError, match="`objective.name` 'ppo' is unknown; valid: clm, dpo, sft"):
        load_config(_write(tmp_path, "objective: ppo\n"))


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "seed: 7\naggregation: {name: fedavg}\n"))
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config
