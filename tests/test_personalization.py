"""Personalization methods from the CLI on the tiny model: what each client keeps and how it is evaluated, the
methods' closed forms (FedSA-LoRA shares only A, finetune with 0 steps is the global model, Ditto's lambda pulls the
personal adapter to the global one, FedDPA's combination), resume bit for bit, and the config refusals."""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, write_config
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from fedlm.cli import app
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.data.collate import collate_for_loss
from fedlm.experiment import build_session
from fedlm.models.adapters import load_trainable_state, trainable_state
from fedlm.models.loading import load_base_model
from fedlm.objectives.base import sequence_logps
from fedlm.personalization.logit_mix import LogitMixture
from fedlm.personalization.profile import load_profile
from fedlm.personalization.runtime import PersonalizedRuntime
from fedlm.personalization.setup import personal_evaluator
from fedlm.personalization.soft_prompt import soft_prompt
from fedlm.personalization.store import ClientStore
from fedlm.personalization.two_adapters import with_local_adapter
from fedlm.reporting.progress import RunConsole

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {
    "federation": {"rounds": 2, "clients_per_round": 3, "local_steps": 2, "batch_size": 4, "lr": 0.003},
    "eval": {"max_examples": 16, "generate": False, "batch_size": 8, "at_start": False},
}


def _config(run: Path, personalization: dict[str, Any], **sections: Any) -> dict[str, Any]:
    merged = {**FAST, **sections}
    return tiny_config(run, personalization=personalization, **merged)


def _run(runner, tmp_path: Path, personalization: dict[str, Any], name: str = "run", **sections: Any) -> Path:
    cfg = write_config(tmp_path / f"{name}.yaml", _config(tmp_path / name, personalization, **sections))
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    return tmp_path / name


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _clients(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "clients").iterdir())


@pytest.mark.parametrize("method", ["finetune", "fedsa", "ditto", "dual", "prompt"])
def test_every_method_runs_from_the_cli_and_leaves_each_client_its_model(runner, tmp_path: Path, method: str) -> None:
    run = _run(runner, tmp_path, {"method": method})
    clients = _clients(run)
    assert len(clients) == 8 and not (run / "adapter" / "personal.json").exists()
    base = load_base_model(validate_config(_config(run, {"method": method})).model, seed=0).model
    for client in clients:
        folder = run / "clients" / client
        info = json.loads((folder / "personal.json").read_text())
        assert info["method"] == method and info["combine"] == {"dual": "dual", "prompt": "prompt"}.get(method, "replace")
        model = PeftModel.from_pretrained(base, str(folder / "adapter"))  # loads with peft
        loaded, saved = get_peft_model_state_dict(model), _weights(folder / "adapter")
        assert set(loaded) == set(saved) and all(torch.equal(loaded[n], saved[n]) for n in saved)
        kept = ClientStore(run / "clients").latest(client)
        if method in ("ditto", "dual") and kept is not None:  # the adapter is the client's last personal state
            assert all(torch.equal(saved[n], kept[n]) for n in kept)
        centroid = load_profile(folder / "profile.safetensors")
        assert centroid.dtype == torch.float32 and centroid.shape == (base.config.hidden_size,)
        base = model.unload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    personal = [r for r in records if r["split"] == "personal"]
    models = {r["model"] for r in personal}
    expected = {"global", "personal", "logits@0.5"} | ({"adapter@0.5"} if method != "prompt" else set()) | ({"local"} if method == "dual" else set())
    assert models == expected
    assert all({"own_loss", "others_loss", "share_loss"} <= set(r) for r in personal if r["own_examples"])
    report = (run / "report.md").read_text()
    assert "## Personalization" in report and (run / "plots" / "personalization.png").is_file()


def test_fedsa_shares_a_only_and_each_client_keeps_its_b(runner, tmp_path: Path) -> None:
    run = _run(runner, tmp_path, {"method": "fedsa"}, federation={**FAST["federation"], "clients_per_round": 8})
    ckpt = load_file(str(run / "checkpoints" / "round_0002" / "global_adapter.safetensors"))
    b_names = [n for n in ckpt if ".lora_B." in n]
    a_names = [n for n in ckpt if ".lora_A." in n]
    assert b_names and a_names
    assert all(torch.count_nonzero(ckpt[n]) == 0 for n in b_names)  # the server's B never moves from its zero init
    first = load_file(str(run / "checkpoints" / "round_0001" / "global_adapter.safetensors"))
    assert any(not torch.equal(first[n], ckpt[n]) for n in a_names)  # A is trained and aggregated
    store = ClientStore(run / "clients")
    own = {c: store.latest(c) for c in _clients(run)}
    assert all(set(b) == set(b_names) for b in own.values() if b is not None)  # a client keeps B only
    one, two = list(own.values())[:2]
    assert one is not None and two is not None and any(not torch.equal(one[n], two[n]) for n in b_names)
    for client, b in own.items():  # personal model = global A + own B
        weights = _weights(run / "clients" / client / "adapter")
        assert b is not None
        for n in a_names:
            assert torch.equal(weights[n], ckpt[n])
        for n in b_names:
            assert torch.equal(weights[n], b[n])


def test_finetune_with_zero_steps_is_the_global_model(runner, tmp_path: Path) -> None:
    run = _run(runner, tmp_path, {"method": "finetune", "local_steps": 0})
    glob = _weights(run / "adapter")
    for client in _clients(run):
        mine = _weights(run / "clients" / client / "adapter")
        assert set(mine) == set(glob) and all(torch.equal(mine[n], glob[n]) for n in glob)


def _b_norm(run: Path) -> float:
    store = ClientStore(run / "clients")
    total = 0.0
    for client in _clients(run):
        state = store.latest(client)
        if state is not None:
            total += sum(float(t.norm()) for n, t in state.items() if ".lora_B." in n)
    return total


def test_ditto_lambda_pulls_the_personal_adapter_to_the_global_one(runner, tmp_path: Path) -> None:
    # one round: the anchor is the initial adapter, whose B is zero; SGD without clipping, so the proximal term acts
    fed = {**FAST["federation"], "rounds": 1, "optimizer": "sgd", "max_grad_norm": None, "lr": 0.05, "local_steps": 4}
    free = _b_norm(_run(runner, tmp_path, {"method": "ditto", "lambda": 0.0}, "free", federation=fed, eval={**FAST["eval"], "every": 0}))
    tied = _b_norm(_run(runner, tmp_path, {"method": "ditto", "lambda": 15.0}, "tied", federation=fed, eval={**FAST["eval"], "every": 0}))
    assert free > 0.0
    assert tied < 0.5 * free  # (1 - lr * lambda) = 0.25 contraction per step towards the global B = 0


def test_dual_combination_weights_the_two_adapters(tmp_path: Path) -> None:
    session = build_session(validate_config(_config(tmp_path / "run", {"method": "dual"})), RunConsole(quiet=True))
    model = session.model
    glob = trainable_state(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    local = trainable_state(model)
    evaluator = personal_evaluator(session)
    loss = {name: evaluator.evaluate(state, 0).records[0]["loss"] for name, state in (("global", glob), ("local", local))}

    def combined(local_state: dict[str, torch.Tensor], weight: float) -> float:
        load_trainable_state(model, glob)
        with with_local_adapter(model, local_state, weight):
            return float(evaluator.evaluate(None, 0).records[0]["loss"])

    assert combined(glob, 0.5) == pytest.approx(loss["global"], rel=1e-5)  # 0.5 dW + 0.5 dW = dW
    assert combined(local, 1.0) == pytest.approx(loss["global"], rel=1e-5)
    assert combined(local, 0.0) == pytest.approx(loss["local"], rel=1e-5)
    middle = combined(local, 0.5)
    assert middle != pytest.approx(loss["global"], rel=1e-5) and middle != pytest.approx(loss["local"], rel=1e-5)
    assert set(trainable_state(model)) == set(glob)  # the local adapter is gone afterwards
    assert all(".fedlm_local." not in n for n, _ in model.named_parameters())

    def mixture(weight: float) -> float:
        mixed = LogitMixture(model, glob, local, weight, nullcontext)
        return float(dataclasses.replace(evaluator, model=mixed).evaluate(None, 0).records[0]["loss"])

    assert mixture(0.0) == pytest.approx(loss["global"], rel=1e-6)
    assert mixture(1.0) == pytest.approx(loss["local"], rel=1e-6)
    half = mixture(0.5)  # -log is convex: -log(p/2 + q/2) <= (-log p - log q) / 2 token by token
    assert half <= 0.5 * (loss["global"] + loss["local"]) + 1e-6
    assert half >= min(loss["global"], loss["local"]) - 1e-6 - 0.6932  # and >= min(-log p, -log q) - log 2


@pytest.mark.parametrize("method", ["ditto", "fedsa"])
def test_resume_keeps_personal_state_bit_for_bit(runner, tmp_path: Path, monkeypatch, method: str) -> None:
    fed = {**FAST["federation"], "rounds": 3}
    full = _run(runner, tmp_path, {"method": method}, "full", federation=fed)
    cfg = write_config(tmp_path / "cut.yaml", _config(tmp_path / "cut", {"method": method}, federation=fed))
    original = PersonalizedRuntime.train_clients

    def crash_after_round_2_trained(self, tasks):  # personal state of round 2 is written, its checkpoint is not
        out = original(self, tasks)
        if next(iter(tasks.values())).plan.round == 2:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(PersonalizedRuntime, "train_clients", crash_after_round_2_trained)
    assert runner.invoke(app, ["run", str(cfg)]).exit_code == 130
    assert any(
        ClientStore(tmp_path / "cut" / "clients").rounds(c) and 2 in ClientStore(tmp_path / "cut" / "clients").rounds(c)
        for c in _clients(tmp_path / "cut")
    )
    monkeypatch.setattr(PersonalizedRuntime, "train_clients", original)
    assert runner.invoke(app, ["run", str(cfg), "--resume"]).exit_code == 0
    for client in _clients(full):
        a, b = _weights(full / "clients" / client / "adapter"), _weights(tmp_path / "cut" / "clients" / client / "adapter")
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a), client
        sa, sb = ClientStore(full / "clients"), ClientStore(tmp_path / "cut" / "clients")
        assert sa.rounds(client) == sb.rounds(client)
        for r in sa.rounds(client):
            x, y = sa.latest(client, r + 1), sb.latest(client, r + 1)
            assert x is not None and y is not None and all(torch.equal(x[n], y[n]) for n in x)


def test_store_rolls_back_and_prunes(tmp_path: Path) -> None:
    store = ClientStore(tmp_path / "clients")
    for r in (1, 2, 4, 5, 6):
        store.save("a", r, {"x": torch.tensor([float(r)])})
    assert store.latest("a", before=4)["x"].item() == 2.0  # type: ignore[index]
    store.rollback(5)
    assert store.rounds("a") == [1, 2, 4, 5]
    store.prune([3, 4])  # round 3 needs the version of round 2; round 4 its own; later ones stay
    assert store.rounds("a") == [2, 4, 5]
    assert store.latest("nobody") is None
    with pytest.raises(FedlmError, match="folder"):
        store.client_dir("../x")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"federation": {"runtime": "flower-simulation"}}, "runs clients in Ray workers"),
        ({"peft": {"method": "full"}}, "peft.method: full"),
        ({"aggregation": {"lora": "ffa"}}, "aggregation.lora: naive"),
    ],
)
def test_config_refusals(tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(FedlmError, match=message):
        validate_config(tiny_config(tmp_path, personalization={"method": "fedsa"}, **extra))


def test_prompt_refusals(tmp_path: Path) -> None:
    with pytest.raises(FedlmError, match="objective: sft"):
        validate_config(tiny_config(tmp_path, personalization={"method": "prompt"}, objective={"name": "dpo"}))
    with pytest.raises(FedlmError, match="weight adapter"):
        validate_config(tiny_config(tmp_path, personalization={"method": "prompt"}, peft={"method": "prompt_tuning", "num_virtual_tokens": 4}))


@pytest.mark.parametrize(
    ("personalization", "message"),
    [({"method": "nope"}, "unknown"), ({"method": "ditto", "lamda": 1.0}, "lamda"), ({"lambda": 1.0}, "method` is required")],
)
def test_section_refusals(tmp_path: Path, personalization: dict[str, Any], message: str) -> None:
    with pytest.raises(FedlmError, match=message):
        validate_config(tiny_config(tmp_path, personalization=personalization))


def test_prompt_personal_model_is_what_peft_loads(runner, tmp_path: Path) -> None:
    """The soft prompt in front of the shared LoRA computes what peft computes from the saved folders: the LoRA merged
    into the base, the prompt loaded as a peft prompt-tuning adapter (a reference implementation not written here)."""
    run = _run(runner, tmp_path, {"method": "prompt", "num_virtual_tokens": 4}, federation={**FAST["federation"], "rounds": 1})
    config = validate_config(_config(run, {"method": "prompt", "num_virtual_tokens": 4}, federation={**FAST["federation"], "rounds": 1}))
    session = build_session(config, RunConsole(quiet=True))
    client = next(c for c in _clients(run) if ClientStore(run / "clients").latest(c) is not None)
    prompt = ClientStore(run / "clients").latest(client)["prompt"]  # type: ignore[index]
    load_trainable_state(session.model, load_file(str(run / "adapter" / "adapter_model.safetensors")))
    batch = collate_for_loss([ex.tokens for ex in session.data.test[:3]], session.loaded.tokenizer.pad_token_id)
    session.model.eval()
    with torch.no_grad(), soft_prompt(session.model, prompt):
        ours = session.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    base = load_base_model(config.model, seed=derive_seed(config.seed, "base-init") % 2**31).model  # the run's base
    merged = PeftModel.from_pretrained(base, str(run / "clients" / client / "adapter")).merge_and_unload()
    reference = PeftModel.from_pretrained(merged, str(run / "clients" / client / "prompt")).eval()
    with torch.no_grad():
        theirs = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 4:]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the losses fedlm computes ask for the labelled positions' logits only: the prompt must shift them
    with torch.no_grad(), soft_prompt(session.model, prompt):
        kept, counts = sequence_logps(session.model, batch)
    target = batch["labels"][:, 1:]
    token_logps = torch.log_softmax(theirs[:, :-1].float(), dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(kept, (token_logps * (target != -100)).sum(dim=1), rtol=1e-4, atol=1e-3)
    assert counts.tolist() == (target != -100).sum(dim=1).tolist()


def test_compare_reports_the_personal_table(tmp_path: Path, runner) -> None:
    out = tmp_path / "cmp"
    cfg = write_config(tmp_path / "c.yaml", _config(out, {"method": "finetune", "local_steps": 1}, federation={**FAST["federation"], "rounds": 1}))
    result = runner.invoke(app, ["compare", str(cfg)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "comparison.json").read_text())
    assert {row["model"] for row in summary["personalization"]["per_model"]} == {"global", "personal", "adapter@0.5", "logits@0.5"}
    assert summary["personalization"]["best"] and "## Personalization" in (out / "comparison.md").read_text()
