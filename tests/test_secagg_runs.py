"""Secure aggregation in runs on the tiny model: the same model as without it (within the quantisation bound),
composition with distributed DP and FFA, a round aborted by dropouts that the next round survives, and refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, write_config
from safetensors.torch import load_file

import fedlm.loop_build.round_side as round_stages
from fedlm.cli import app
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IID = {"method": "iid", "num_clients": 6, "field": None}
FED = {"rounds": 1, "clients_per_round": 5, "local_steps": 1, "batch_size": 4, "optimizer": "sgd", "lr": 0.5}
EVAL = {"every": 0, "generate": False, "max_examples": 8, "at_start": False}


def _config(root: Path, privacy: dict[str, Any], **sections: Any) -> dict[str, Any]:
    fed = {**FED, **sections.pop("federation", {})}
    partition = sections.pop("partition", IID)
    return tiny_config(root, privacy=privacy, partition=partition, federation=fed, eval=EVAL, **sections)


def _run(runner, root: Path, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    result = runner.invoke(app, ["run", str(write_config(root.parent / f"{root.name}.yaml", config))])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    return load_file(str(root / "adapter" / "adapter_model.safetensors")), records


def test_a_secure_round_gives_fedavgs_model_within_the_quantisation_bound(runner, tmp_path: Path) -> None:
    plain, _ = _run(runner, tmp_path / "plain", _config(tmp_path / "plain", {}))
    secure, records = _run(runner, tmp_path / "secure", _config(tmp_path / "secure", {"secure_aggregation": {"max_weight": 64}}))
    (agg,) = [r for r in records if r["split"] == "aggregate"]
    m = agg["aggregation"]
    assert m["secagg_survivors"] == agg["clients"] and m["secagg_clipped_coordinates"] == 0
    weight = sum(r["num_examples"] for r in records if r["split"] == "train") / 64  # sum of w_k, all under the cap
    bound = m["secagg_sum_error_bound"] / weight * 1.01  # error of the decoded mean, weight quantisation included
    diff = max(float((plain[k] - secure[k]).abs().max()) for k in plain)
    assert 0 < diff <= bound
    moved = max(float(plain[k].abs().max()) for k in plain if "lora_B" in k)
    assert moved > 100 * bound  # the bound is tight compared with the update itself
    up = [r["upload_bytes"] for r in records if r["split"] == "train"]
    assert all(u > 0 for u in up) and agg["upload_bytes"] == sum(up)


def test_distributed_dp_under_secure_aggregation_and_ffa(runner, tmp_path: Path) -> None:
    privacy = {"secure_aggregation": {"neighbours": 2, "threshold": 2}, "client_dp": {"noise_multiplier": 0.3, "clip": 0.05, "mode": "distributed"}}
    _, records = _run(
        runner, tmp_path / "run", _config(tmp_path / "run", privacy, aggregation={"name": "fedavgm", "lora": "ffa"}, federation={"rounds": 2})
    )
    rounds = [r for r in records if r["split"] == "aggregate"]
    assert len(rounds) == 2 and all(not r["skipped"] and r["aggregation"]["epsilon"] > 0 for r in rounds)
    assert all(r["aggregation"]["dp_noise_std"] == pytest.approx(0.3 * 0.05) for r in rounds)  # all 5 of m = 5 reported


def test_too_many_dropouts_skip_the_round_and_the_next_one_proceeds(runner, tmp_path: Path, monkeypatch) -> None:
    build = round_stages.build_secure_aggregation

    def with_dropouts(*args: Any):
        secure = build(*args)
        secure.drop = {1: {"unmask": set(experiment_clients[:3])}}  # 2 of 5 left, threshold 4
        return secure

    experiment_clients = [str(i) for i in range(6)]
    monkeypatch.setattr(round_stages, "build_secure_aggregation", with_dropouts)
    config = _config(tmp_path / "run", {"secure_aggregation": {}}, federation={"rounds": 2, "clients_per_round": 6})
    _, records = _run(runner, tmp_path / "run", config)
    first, second = [r for r in records if r["split"] == "aggregate"]
    assert first["skipped"] and "fewer than the threshold 4" in first["aggregation"]["secagg_aborted"]
    assert not second["skipped"] and len(second["aggregation"]["secagg_survivors"]) == 6


@pytest.mark.parametrize(
    "privacy, sections, message",
    [
        ({"secure_aggregation": {"threshold": 6}}, {}, "above the clients per round"),
        ({"secure_aggregation": {"threshold": 2}}, {}, "more than half"),
        ({"secure_aggregation": {"neighbours": 2, "threshold": 4}}, {"federation": {"clients_per_round": 6}}, "above the 3 holders"),
        ({"secure_aggregation": {"neighbours": 3}}, {}, "must be even"),
        (
            {"secure_aggregation": {"quantization_bits": 28}},
            {"federation": {"clients_per_round": 20}, "partition": {**IID, "num_clients": 40}},
            "overflows",
        ),
        ({"secure_aggregation": {}}, {"aggregation": {"name": "krum"}}, "needs the individual ones"),
        ({"secure_aggregation": {}}, {"aggregation": {"name": "fltrust"}}, "needs the individual ones"),
        ({"secure_aggregation": {}}, {"aggregation": {"name": "scaffold"}}, "control-variate"),
        ({"secure_aggregation": {}}, {"aggregation": {"name": "fedavg", "lora": "exact"}}, "lora: exact"),
        ({"secure_aggregation": {}, "client_dp": {"noise_multiplier": 1.0, "adaptive": True, "count_noise_std": 5.0}}, {}, "adaptive"),
        ({"client_dp": {"noise_multiplier": 1.0, "mode": "distributed"}}, {}, "secure_aggregation"),
    ],
)
def test_bad_secure_aggregation_settings_are_refused_at_load(tmp_path: Path, privacy: dict, sections: dict, message: str) -> None:
    with pytest.raises(FedlmError, match=message):
        validate_config(_config(tmp_path / "run", privacy, **sections))
