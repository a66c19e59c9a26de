"""End to end through the CLI on the tiny model: the run directory, the adapter, compare, data partition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DTYPES, tiny_config, write_config
from peft import PeftModel
from safetensors.torch import load_file

from fedlm.cli import app
from fedlm.core.seeding import derive_seed
from fedlm.models.tiny import build_byte_tokenizer, build_tiny_llama


def test_run_writes_a_complete_run_directory(tmp_path: Path, runner) -> None:
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(out))
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "metrics.jsonl", "report.md", "run.log", "adapter/adapter_model.safetensors", "plots/loss.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["round_0000.jsonl", "round_0001.jsonl", "round_0002.jsonl"]
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] != []

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"round", "split", "client"} <= set(r) for r in records)
    splits = {r["split"] for r in records}
    assert {"global_test", "train", "aggregate"} <= splits
    assert any(s.startswith("client_") and s.endswith("_test") for s in splits)
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 2 * 3 and all(r["steps"] == 2 for r in train)

    row = json.loads((out / "predictions" / "round_0002.jsonl").read_text().splitlines()[0])
    assert {"prompt", "prediction", "reference", "domain", "word"} <= set(row)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_adapter_loads_with_peft_and_matches_the_final_state(dtype: str, tmp_path: Path, runner) -> None:
    """In either compute dtype the adapter is saved in float32 and peft reloads it, onto a base in that dtype, exactly."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(out, model={"dtype": dtype}, federation={"rounds": 1}))
    assert runner.invoke(app, ["run", str(cfg)]).exit_code == 0
    tokenizer = build_byte_tokenizer()
    base = build_tiny_llama(len(tokenizer), seed=derive_seed(0, "base-init") % 2**31, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    final = load_file(str(out / "checkpoints" / "round_0001" / "global_adapter.safetensors"))
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "adapter" / "adapter_model.safetensors")).values())
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert set(loaded) == set(final)
    for name, tensor in final.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    assert any(t.abs().sum() > 0 for n, t in final.items() if "lora_B" in n)


def test_existing_output_dir_is_refused_without_flags(tmp_path: Path, runner) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cfg = write_config(tmp_path / "c.yaml", tiny_config(out))
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2
    assert "is not empty: it holds keep.txt but no run" in result.output and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "precious"


def test_compare_writes_a_table_of_all_four_arms(tmp_path: Path, runner) -> None:
    out = tmp_path / "cmp"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(out, eval={"generate": False, "max_examples": 16}))
    result = runner.invoke(app, ["compare", str(cfg)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "comparison.json").read_text())
    methods = [row["method"] for row in summary["global_test"]]
    assert methods == ["base", "local-only (mean)", "centralized", "federated"]
    assert all(row["loss"] is not None for row in summary["global_test"])
    assert (out / "federated" / "adapter" / "adapter_config.json").is_file()
    markdown = (out / "comparison.md").read_text()
    assert "| federated |" in markdown and "Model tiny-random-llama (float32 on cpu)" in markdown
    assert "test set embedded:wordnet_defs/test (16 examples, a seeded sample of 16; 6 client shares)" in markdown
    assert (out / "plots" / "comparison.png").is_file() and "plots/comparison.png" in (out / "report.md").read_text()
    assert f"{out}/comparison.md" in " ".join(result.output.split()).replace(" /", "/")
    # Each client trained alone for exactly the steps it trained in the federation (2 rounds x 3 of 8 clients).
    assert len(summary["local_only_global_test"]) == len({c for r in range(1, 3) for c in _sampled(r)})


def _sampled(round_num: int) -> list[str]:
    from fedlm.core.sampling import sample_clients

    names = ["noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.person", "noun.plant", "verb.communication", "verb.motion"]
    return sample_clients(names, 3, 0, round_num)


def test_data_partition_prints_clients(tmp_path: Path, runner) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "x", partition={"method": "dirichlet", "num_clients": 4, "alpha": 0.3}))
    result = runner.invoke(app, ["data", "partition", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "dirichlet partition" in result.output and "noun.animal" in result.output
