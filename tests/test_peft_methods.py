"""Every ``peft.method`` on the tiny model: one federated round changes only its trainable tensors, the update holds
exactly them, the saved adapter (float32) reloads (with ``peft``, or as a full model) to identical logits in the
run's compute dtype, float32 and bfloat16 alike; refusals at load.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DTYPES, tiny_config
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedlm.config import ModelConfig
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.core.task import LocalPlan
from fedlm.experiment import Session, build_session, run_federated
from fedlm.models.adapters import named_trainable_parameters, trainable_state
from fedlm.models.full import FULL_MAX_PARAMS, check_full_size
from fedlm.models.loading import load_base_model
from fedlm.models.tiny import build_byte_tokenizer, build_tiny_llama
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import RunDir

METHODS = ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "full"]
VIRTUAL = 4
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(out: Path, method: str, clients: int = 2, **sections: dict[str, Any]) -> dict[str, Any]:
    peft: dict[str, Any] = {"method": method}
    if method in ("lora", "dora"):
        peft.update(r=4, alpha=8, dropout=0.0)
    if method in ("prompt_tuning", "prefix_tuning"):
        peft["num_virtual_tokens"] = VIRTUAL
    cfg = tiny_config(
        out,
        peft=peft,
        data={"max_train_examples": 40, "max_length": 64},
        partition={"method": "iid", "num_clients": clients},
        federation={"rounds": 1, "clients_per_round": clients, "local_steps": 1, "batch_size": 2, "lr": 0.01},
        eval={"every": 0, "at_start": False, "generate": False, "max_examples": 4, "batch_size": 4},
    )
    cfg["peft"] = peft  # not merged with tiny_config's LoRA fields: only what applies to the method
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def _session(out: Path, method: str, **sections: dict[str, Any]) -> Session:
    return build_session(validate_config(_config(out, method, **sections)), RunConsole(quiet=True))


def _run(session: Session, out: Path) -> RunDir:
    run_dir = RunDir(out)
    run_dir.create()
    run_federated(session, run_dir, resume=False, console=RunConsole(quiet=True))
    return run_dir


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[5, 70, 80, 90, 100, 3], [0, 0, 60, 61, 62, 63]])
    mask = (ids != 0).long()
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_one_round_changes_only_trainable_tensors_and_the_adapter_reloads(method: str, dtype: str, tmp_path: Path) -> None:
    session = _session(tmp_path / "run", method, model={"dtype": dtype})
    model = session.model
    assert session.loaded.dtype == getattr(torch, dtype)
    trainable = set(named_trainable_parameters(model))
    assert trainable and set(session.initial_state) == trainable
    frozen_before = {n: t.detach().clone() for n, t in model.state_dict().items() if not _is_trainable(model, n)}
    if method == "full":
        assert not [n for n, p in model.named_parameters() if not p.requires_grad]
    else:
        assert frozen_before  # the base model's weights

    # the update of one client holds exactly the trainable tensors
    fed = session.config.federation
    client = session.data.client_names[0]
    plan = LocalPlan(round=1, lrs=[fed.lr], batch_size=fed.batch_size, seed=1)
    update = session.trainer().train(client, session.data.client_train[client], session.initial_state, plan)
    assert set(update.tensors) == trainable
    assert all(t.dtype == torch.float32 for t in update.tensors.values())
    assert any(t.abs().sum() > 0 for t in update.tensors.values())

    # one federated round (2 clients, 1 local step)
    run_dir = _run(session, tmp_path / "run")
    after = model.state_dict()
    changed_frozen = [n for n, t in frozen_before.items() if not torch.equal(after[n], t)]
    assert not changed_frozen, f"frozen tensors changed: {changed_frozen[:3]}"
    final = load_file(str(run_dir.checkpoints / "round_0001" / "global_adapter.safetensors"))
    assert set(final) == trainable
    assert any(not torch.equal(final[n], session.initial_state[n].float()) for n in final)

    # the saved adapter holds the trained values in float32, and reloads in the run's dtype to identical logits
    ours = _logits(model)
    if method == "full":
        saved = load_file(str(run_dir.adapter / "model.safetensors"))
        reloaded = AutoModelForCausalLM.from_pretrained(str(run_dir.adapter), dtype=getattr(torch, dtype))
        assert (run_dir.adapter / "README.md").is_file()
    else:
        saved = load_file(str(run_dir.adapter / "adapter_model.safetensors"))
        base = build_tiny_llama(len(build_byte_tokenizer()), seed=derive_seed(0, "base-init") % 2**31, dtype=getattr(torch, dtype))
        reloaded = PeftModel.from_pretrained(base, str(run_dir.adapter))
    assert set(saved) == trainable
    assert all(t.dtype == torch.float32 and torch.equal(t, final[n].float()) for n, t in saved.items())
    state = dict(reloaded.named_parameters()) if method == "full" else get_peft_model_state_dict(reloaded)
    assert set(state) == trainable and all(torch.equal(state[n].float(), saved[n]) for n in trainable)
    theirs = _logits(reloaded)
    if method == "prompt_tuning":  # peft returns the soft prompt's positions too; fedlm cuts them off
        theirs = theirs[:, VIRTUAL:]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def _is_trainable(model: torch.nn.Module, state_key: str) -> bool:
    params = dict(model.named_parameters())
    return state_key in params and params[state_key].requires_grad


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning"])
def test_trainable_state_is_peft_state_dict(method: str) -> None:
    """The update names are peft's saved names, in peft's order, with peft's values (LoRA: as before this change)."""
    from fedlm.config import PeftConfig
    from fedlm.models.adapters import attach_adapter

    model = build_tiny_llama(len(build_byte_tokenizer())).requires_grad_(False)
    peft = PeftConfig(method=method, r=4, num_virtual_tokens=VIRTUAL if "tuning" in method else None)
    model = attach_adapter(model, peft, seed=3)
    state, saved = trainable_state(model), get_peft_model_state_dict(model)
    assert list(state) == list(saved)
    assert all(torch.equal(state[n], saved[n]) for n in state)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_evaluator_loss_and_batched_greedy_decoding_with_virtual_tokens(method: str, tmp_path: Path) -> None:
    """Loss from logits equals peft's own loss; left-padded batched generation equals one prompt at a time."""
    session = _session(tmp_path / "run", method, eval={"generate": True, "max_new_tokens": 4, "max_examples": 4})
    with torch.no_grad():
        for p in named_trainable_parameters(session.model).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    state = trainable_state(session.model)
    batched = session.evaluator(None)
    single = dataclasses.replace(batched, config=batched.config.model_copy(update={"batch_size": 1}))
    one, many = single.evaluate(state, 0), batched.evaluate(state, 0)
    assert [r["prediction"] for r in one.predictions] == [r["prediction"] for r in many.predictions]
    example = session.data.test[0].tokens
    ids = torch.tensor([example.input_ids])
    labels = torch.tensor([example.labels])
    peft_loss = session.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    row = one.predictions[0]
    torch.testing.assert_close(torch.tensor(row["nll"] / row["num_tokens"]), peft_loss.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "method"), [("median", "ia3"), ("krum", "ia3"), ("krum", "dora"), ("median", "prompt_tuning")])
def test_robust_aggregators_run_on_non_lora_methods(name: str, method: str, tmp_path: Path) -> None:
    session = _session(tmp_path / "run", method, aggregation={"name": name}, partition={"num_clients": 3}, federation={"clients_per_round": 3})
    final = _run(session, tmp_path / "run")
    state = load_file(str(final.checkpoints / "round_0001" / "global_adapter.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())


# refusals at load ------------------------------------------------------------------------------------------------


def _refused(tmp_path: Path, method: str, **sections: dict[str, Any]) -> str:
    with pytest.raises(FedlmError) as info:
        validate_config(_config(tmp_path / "run", method, **sections))
    return str(info.value)


@pytest.mark.parametrize(("mode", "method"), [("exact", "ia3"), ("ffa", "dora"), ("exact", "full"), ("ffa", "prompt_tuning")])
def test_lora_aggregation_modes_need_lora(mode: str, method: str, tmp_path: Path) -> None:
    message = _refused(tmp_path, method, aggregation={"lora": mode})
    assert f"`aggregation.lora: {mode}` needs `peft.method: lora`" in message and repr(method) in message


def test_client_ranks_need_lora(tmp_path: Path) -> None:
    message = _refused(tmp_path, "prompt_tuning", peft={"client_ranks": [1, 2]})
    assert "`peft.client_ranks` needs `peft.method: lora`" in message


def test_sample_dp_needs_lora(tmp_path: Path) -> None:
    message = _refused(tmp_path, "ia3", privacy={"sample_dp": {"noise_multiplier": 1.0}})
    assert "`privacy.sample_dp` needs `peft.method: lora`" in message


def test_method_fields_are_checked_by_name(tmp_path: Path) -> None:
    assert "`peft.num_virtual_tokens`" in _refused(tmp_path, "prefix_tuning", peft={"num_virtual_tokens": 0})
    message = _refused(tmp_path, "ia3", peft={"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]})
    assert "`peft.feedforward_modules`" in message and "`peft.target_modules`" in message
    assert "`peft.method`" in _refused(tmp_path, "adalora")


def test_method_defaults_fill_the_resolved_config(tmp_path: Path) -> None:
    ia3 = validate_config(_config(tmp_path, "ia3")).peft
    assert ia3.target_modules == ["k_proj", "v_proj", "down_proj"] and ia3.feedforward_modules == ["down_proj"]
    prompt = validate_config(_config(tmp_path, "prompt_tuning", peft={"num_virtual_tokens": None})).peft
    assert prompt.num_virtual_tokens == 20
    lora = validate_config(tiny_config(tmp_path)).peft
    assert lora.feedforward_modules is None and lora.num_virtual_tokens is None  # LoRA's resolved config as before


def test_full_is_refused_above_the_size_limit() -> None:
    check_full_size(FULL_MAX_PARAMS["cpu"], "cpu")
    with pytest.raises(FedlmError, match=r"has 360M parameters, above the 200M limit on cpu"):
        check_full_size(360_000_000, "cpu")
    check_full_size(360_000_000, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_adapter_folder_is_a_base_model_folder(dtype: str, tmp_path: Path) -> None:
    """A full run's adapter/ loads as `model.name` (tokenizer with chat template included): in the run's dtype to the
    trained model's logits, in float32 to the trained weights bit for bit (the folder is float32)."""
    session = _session(tmp_path / "run", "full", model={"dtype": dtype})
    run_dir = _run(session, tmp_path / "run")
    trained = dict(session.model.named_parameters())
    loaded = load_base_model(ModelConfig(name=str(run_dir.adapter), dtype=dtype), device=torch.device("cpu"))
    assert loaded.tokenizer.chat_template is not None
    assert loaded.model.dtype == getattr(torch, dtype)
    torch.testing.assert_close(_logits(loaded.model), _logits(session.model), atol=1e-6, rtol=0)
    as32 = load_base_model(ModelConfig(name=str(run_dir.adapter), dtype="float32"), device=torch.device("cpu")).model
    assert as32.config.dtype == torch.float32 and set(dict(as32.named_parameters())) == set(trained)
    assert all(torch.equal(p, trained[n].float()) for n, p in as32.named_parameters())


@pytest.mark.parametrize(("method", "dtype"), [("dora", "float32"), ("prefix_tuning", "float32"), ("full", "float32"), ("full", "bfloat16")])
def test_resume_gives_the_uninterrupted_result(method: str, dtype: str, tmp_path: Path) -> None:
    """Two rounds in one go equal one round, then `--resume` with two rounds (checkpoints hold any method's state, a
    bfloat16 full run's global weights bit for bit in bfloat16)."""
    from conftest import write_config
    from typer.testing import CliRunner

    from fedlm.cli import app

    runs = {}
    for name, rounds_first in (("straight", 2), ("resumed", 1)):
        cfg = _config(tmp_path / name, method, model={"dtype": dtype})
        cfg["federation"]["rounds"] = rounds_first
        path = write_config(tmp_path / f"{name}.yaml", cfg)
        assert CliRunner().invoke(app, ["run", str(path)]).exit_code == 0
        if rounds_first == 1:
            result = CliRunner().invoke(app, ["run", str(path), "--resume", "--set", "federation.rounds=2"])
            assert result.exit_code == 0, result.output
        runs[name] = load_file(str(tmp_path / name / "checkpoints" / "round_0002" / "global_adapter.safetensors"))
    assert set(runs["straight"]) == set(runs["resumed"])
    assert all(torch.equal(runs["straight"][n], runs["resumed"][n]) for n in runs["straight"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_the_training_loss_is_hugging_faces_with_logits_only_where_labels_count(tmp_path: Path, method: str, dtype: str) -> None:
    """The default objective computes logits only at labelled positions (``logits_to_keep``) where the model allows
    it; its loss and gradients must be Hugging Face's own ``model(labels=...).loss`` (the reference), for every PEFT
    method (prompt learning falls back to all positions)."""
    from fedlm.objectives.base import keeps_logits

    session = _session(tmp_path, method, model={"dtype": dtype})
    model = session.model
    assert keeps_logits(model) == (method not in ("prompt_tuning", "prefix_tuning"))
    batch = session.objective.collate(session.data.client_train[session.data.client_names[0]][:3], 0)
    model.train()
    ours, _ = session.objective.loss(model, batch)
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference = model(**batch).loss
    reference.backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert ours.item() == pytest.approx(reference.item(), rel=tol)
    assert ours_grads.keys() == reference_grads.keys() and ours_grads
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad.float(), reference_grads[name].float(), rtol=tol * 10, atol=tol)
