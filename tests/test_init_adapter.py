"""``model.init_adapter``: a run starts from an earlier run's adapter (stages chained); mismatches are refused with
both runs' ``peft`` settings; ``fedlm export --merge`` gives a folder that ``model.name`` loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import DTYPES, tiny_config, write_config
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fedlm.cli import app
from fedlm.config import ModelConfig
from fedlm.config.io import load_config, validate_config
from fedlm.core.errors import FedlmError
from fedlm.experiment import build_session
from fedlm.models.adapters import load_trainable_state
from fedlm.models.loading import load_base_model
from fedlm.reporting.progress import RunConsole

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(out: Path, method: str = "lora", init: Path | None = None, **peft: Any) -> dict[str, Any]:
    fields = {"method": method, **({"r": 4, "alpha": 8, "dropout": 0.0} if method == "lora" else {}), **peft}
    if method in ("prompt_tuning", "prefix_tuning"):
        fields.setdefault("num_virtual_tokens", 4)
    cfg = tiny_config(
        out,
        data={"max_train_examples": 40, "max_length": 64},
        partition={"method": "iid", "num_clients": 2},
        federation={"rounds": 1, "clients_per_round": 2, "local_steps": 1, "batch_size": 2, "lr": 0.01},
        eval={"every": 1, "at_start": True, "generate": False, "max_examples": 4, "batch_size": 4},
    )
    cfg["peft"] = fields
    if init is not None:
        cfg["model"]["init_adapter"] = str(init)
    return cfg


def _run(tmp_path: Path, name: str, cfg: dict[str, Any]) -> Path:
    result = CliRunner().invoke(app, ["run", str(write_config(tmp_path / f"{name}.yaml", cfg))])
    assert result.exit_code == 0, result.output
    return Path(cfg["output_dir"])


def _global_loss(run: Path, round_num: int) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if r["split"] == "global_test" and r["round"] == round_num)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning", "full"])
def test_second_stage_starts_where_the_first_ended(method: str, dtype: str, tmp_path: Path) -> None:
    """Run B's starting global state is run A's final adapter, and B's round-0 loss is A's final loss (both runs in
    ``dtype``: the saved float32 adapter loses nothing of a bfloat16 run either)."""
    cfg_a = _config(tmp_path / "a", method)
    cfg_a["model"]["dtype"] = dtype
    run_a = _run(tmp_path, "a", cfg_a)
    cfg_b = _config(tmp_path / "b", method, init=run_a / "adapter")
    cfg_b["model"]["dtype"] = dtype
    session = build_session(validate_config(cfg_b), RunConsole(quiet=True))
    final_a = load_file(str(run_a / "checkpoints" / "round_0001" / "global_adapter.safetensors"))
    assert set(session.initial_state) == set(final_a)
    assert all(torch.equal(session.initial_state[n].float(), final_a[n]) for n in final_a)
    run_b = _run(tmp_path, "b", cfg_b)
    assert _global_loss(run_b, 0) == _global_loss(run_a, 1)
    assert "from " in (run_b / "report.md").read_text()


def test_ffa_stage_takes_the_frozen_factors_from_the_earlier_adapter(tmp_path: Path) -> None:
    """Under FFA-LoRA the frozen A is not in the trainable state; it must come from the earlier adapter too."""
    run_a = _run(tmp_path, "a", _config(tmp_path / "a"))
    cfg_b = _config(tmp_path / "b", init=run_a / "adapter")
    cfg_b["aggregation"] = {"name": "fedavg", "lora": "ffa"}
    session = build_session(validate_config(cfg_b), RunConsole(quiet=True))
    saved = load_file(str(run_a / "adapter" / "adapter_model.safetensors"))
    params = {n.replace(".default", ""): p for n, p in session.model.named_parameters() if "lora_" in n}
    assert all(torch.equal(params[n], saved[n]) for n in saved)
    assert all("lora_B" in n for n in session.initial_state)


@pytest.mark.parametrize(("change", "needle"), [({"r": 2}, '"r": 2'), ({"method": "ia3"}, '"method": "ia3"')])
def test_a_different_peft_setup_is_refused_naming_both(change: dict[str, Any], needle: str, tmp_path: Path) -> None:
    run_a = _run(tmp_path, "a", _config(tmp_path / "a"))
    fields = {"r": 4, "alpha": 8, "dropout": 0.0, **change} if change.get("method") is None else change
    cfg_b = _config(tmp_path / "b", init=run_a / "adapter")
    cfg_b["peft"] = {"method": "lora", **fields}
    with pytest.raises(FedlmError) as info:
        validate_config(cfg_b)
    message = str(info.value)
    assert "`model.init_adapter`" in message and "that run's `peft`" in message
    assert '"r": 4' in message and needle in message  # the earlier run's settings and this config's


def test_a_tensor_shape_mismatch_is_refused_when_the_session_is_built(tmp_path: Path) -> None:
    """A folder whose config matches but whose tensors do not (edited, or another base model) fails before training."""
    run_a = _run(tmp_path, "a", _config(tmp_path / "a"))
    folder = tmp_path / "edited"
    shutil.copytree(run_a / "adapter", folder)
    state = load_file(str(folder / "adapter_model.safetensors"))
    name = sorted(n for n in state if "lora_A" in n)[0]
    state[name] = torch.zeros(4, 32)
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(FedlmError, match=r"does not fit this model's adapter .* tensor .*lora_A.* has shape \(4, 32\)"):
        build_session(validate_config(_config(tmp_path / "b", init=folder)), RunConsole(quiet=True))


def test_missing_or_wrong_kind_of_folder_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(FedlmError, match=r"`model.init_adapter` .* is not a folder"):
        validate_config(_config(tmp_path / "b", init=tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedlmError, match=r"no adapter_config.json"):
        validate_config(_config(tmp_path / "b", init=tmp_path / "empty"))
    with pytest.raises(FedlmError, match=r"holds no model\*.safetensors"):
        validate_config(_config(tmp_path / "b", "full", init=tmp_path / "empty"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_export_merge_gives_a_base_model_folder(dtype: str, tmp_path: Path) -> None:
    """`fedlm export --merge` folds the adapter in, in float32 whatever the run trained in; `model.name: OUT` loads it
    to the adapted model's logits (base + unmerged adapter, in float32), far from the base model's own."""
    cfg = _config(tmp_path / "a")
    cfg["model"]["dtype"] = dtype
    run_a = _run(tmp_path, "a", cfg)
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["export", "--merge", str(run_a), str(out)])
    assert result.exit_code == 0, result.output
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "model.safetensors")).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    config = load_config(run_a / "config.yaml")
    assert config.model.dtype == dtype
    config = config.model_copy(update={"model": config.model.model_copy(update={"dtype": "float32"})})
    session = build_session(config, RunConsole(quiet=True))
    ids = torch.tensor([[5, 70, 80, 90, 100, 3]])
    session.model.eval()
    with torch.no_grad():
        base_logits = session.model(input_ids=ids).logits  # the adapter's start: LoRA's B = 0
        load_trainable_state(session.model, load_file(str(run_a / "checkpoints" / "round_0001" / "global_adapter.safetensors")))
        adapted = session.model(input_ids=ids).logits
        merged = load_base_model(ModelConfig(name=str(out), dtype="float32"), device=torch.device("cpu")).model
        ours = merged(input_ids=ids).logits
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapter matters...
    torch.testing.assert_close(ours, adapted, atol=1e-5, rtol=1e-5)  # ...and the merged folder has it


def test_export_refuses_what_cannot_merge(tmp_path: Path) -> None:
    run = tmp_path / "prompt"
    (run / "adapter").mkdir(parents=True)
    cfg = _config(run, "prompt_tuning")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["export", "--merge", str(run), str(tmp_path / "out")])
    assert result.exit_code == 2 and "nothing to merge" in result.output
    result = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "out")])
    assert result.exit_code == 2 and "--merge" in result.output
