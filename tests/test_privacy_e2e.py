"""Client-level DP in runs on the tiny model: epsilon logged per round from the accountant, a target epsilon met,
exact resume with the noise, and clear refusals at load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, write_config
from safetensors.torch import load_file

from fedlm.cli import app
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.privacy.accounting import epsilon

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IID = {"method": "iid", "num_clients": 8, "field": None}
FED = {"rounds": 3, "clients_per_round": 4, "local_steps": 1, "batch_size": 4}
EVAL = {"every": 0, "generate": False, "max_examples": 8}


def _config(root: Path, privacy: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return tiny_config(root, privacy=privacy, partition=IID, federation={**FED, **sections.pop("federation", {})}, eval=EVAL, **sections)


def _run(runner, root: Path, config: dict[str, Any], *args: str) -> list[dict]:
    result = runner.invoke(app, ["run", str(write_config(root.parent / f"{root.name}.yaml", config)), *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


def test_epsilon_per_round_is_the_accountants(runner, tmp_path: Path) -> None:
    records = _run(runner, tmp_path / "run", _config(tmp_path / "run", {"client_dp": {"noise_multiplier": 1.2, "clip": 0.1}, "delta": 1e-4}))
    rounds = [r for r in records if r["split"] == "aggregate"]
    eps = [r["aggregation"]["epsilon"] for r in rounds]
    assert eps == pytest.approx([epsilon(1.2, 0.5, t, 1e-4) for t in (1, 2, 3)], rel=1e-9)
    assert eps[0] < eps[1] < eps[2]
    assert all(r["aggregation"]["dp_clip"] == 0.1 and r["aggregation"]["delta"] == 1e-4 for r in rounds)


def test_a_target_epsilon_is_met_after_the_last_round(runner, tmp_path: Path) -> None:
    records = _run(runner, tmp_path / "run", _config(tmp_path / "run", {"client_dp": {"target_epsilon": 5.0, "clip": 0.1}}))
    final = [r for r in records if r["split"] == "aggregate"][-1]["aggregation"]["epsilon"]
    assert 0.98 * 5.0 <= final <= 5.0


def test_resume_with_dp_noise_is_exact(runner, tmp_path: Path) -> None:
    privacy = {"client_dp": {"noise_multiplier": 1.0, "clip": 0.1, "adaptive": True, "count_noise_std": 1.0}}
    straight = _config(tmp_path / "a", privacy, aggregation={"name": "fedadam"})
    _run(runner, tmp_path / "a", straight)
    split = _config(tmp_path / "b", privacy, aggregation={"name": "fedadam"}, federation={"rounds": 1})
    _run(runner, tmp_path / "b", split)
    _run(runner, tmp_path / "b", split, "--resume", "--set", "federation.rounds=3")
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "privacy, sections, message",
    [
        ({"client_dp": {"noise_multiplier": 1.0, "mode": "distributed"}}, {}, "secure_aggregation"),
        ({"client_dp": {"noise_multiplier": 1.0}}, {"aggregation": {"name": "krum"}}, "krum"),
        ({"client_dp": {"noise_multiplier": 1.0, "adaptive": True}}, {}, "count_noise_std"),
        ({"client_dp": {"target_epsilon": 0.001}}, {"federation": {"rounds": 500, "clients_per_round": 8}}, "cannot be reached"),
        ({"client_dp": {"noise_multiplier": 1.0, "target_epsilon": 3.0}}, {}, "exactly one"),
        ({"client_dp": {"clip": 0.0, "noise_multiplier": 1.0}}, {}, "`privacy.client_dp.clip`"),
        ({"delta": 1.0}, {}, "`privacy.delta`"),
    ],
)
def test_bad_privacy_settings_are_refused_at_load(tmp_path: Path, privacy: dict, sections: dict, message: str) -> None:
    with pytest.raises(FedlmError, match=message):
        validate_config(_config(tmp_path / "run", privacy, **sections))
