"""The three-stage chain of examples/lifecycle (clm -> sft -> dpo, each from the previous adapter) from the CLI,
on the tiny model: the example configs themselves, with only the model, sizes and output folders overridden."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import write_config

from fedlm.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "lifecycle"
STAGES = ["1_pretrain", "2_sft", "3_dpo"]


def _tiny(stage: str, root: Path) -> dict:
    config = yaml.safe_load((EXAMPLES / f"{stage}.yaml").read_text())
    config["output_dir"] = str(root / stage)
    config["model"]["name"] = "tiny-random-llama"
    if "init_adapter" in config["model"]:
        previous = STAGES[STAGES.index(stage) - 1]
        config["model"]["init_adapter"] = str(root / previous / "adapter")
    config["peft"].update(r=4, alpha=8)
    config["data"].update(max_train_examples=48, max_length=256)
    config["federation"].update(rounds=1, clients_per_round=2, local_steps=1, batch_size=2)
    config["eval"].update(every=1, max_examples=4, at_start=True)
    if config["objective"] == "sft":
        config["eval"].update(generate=False)
    return config


def test_pretrain_then_sft_then_dpo_chain_from_the_cli(runner, tmp_path: Path) -> None:
    finals = {}
    for stage in STAGES:
        cfg = write_config(tmp_path / f"{stage}.yaml", _tiny(stage, tmp_path))
        result = runner.invoke(app, ["run", str(cfg)])
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        finals[stage] = {r["round"]: r for r in records if r["split"] == "global_test"}
        assert (tmp_path / stage / "adapter" / "adapter_model.safetensors").is_file()
    assert "perplexity" in finals["1_pretrain"][1]
    assert "loss" in finals["2_sft"][1]
    dpo = finals["3_dpo"]
    assert {"preference_accuracy", "reward_margin"} <= set(dpo[1])
    # round 0: the policy is the SFT adapter it started from and so is the reference (`reference: init_adapter`), so
    # every margin is exactly 0 and the loss exactly log 2 (with the base model as reference they would not be)
    assert dpo[0]["reward_margin"] == 0.0 and dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert dpo[1]["reward_margin"] != 0.0
