"""Offsite-tuning (``offsite``): the emulator's layer selection, what a client receives, the adapter plug-in, the
distillation, and the refusals; one tiny-model CLI run (FedBiOT's alignment on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from fedlm.cli.main import app
from fedlm.config.io import load_config
from fedlm.config.schema import PeftConfig
from fedlm.core.errors import FedlmError
from fedlm.models.adapters import attach_adapter, load_trainable_state, trainable_state
from fedlm.models.tiny import build_byte_tokenizer, build_tiny_llama, tiny_num_layers
from fedlm.offsite.distill import PublicText, distill_middle, middle_gap, middle_output
from fedlm.offsite.emulator import base_weights, build_emulator
from fedlm.offsite.fedbiot import EmulatorAlignment
from fedlm.offsite.layers import plan_layers, uniform_choice
from fedlm.offsite.plugin import check_plug_in, plug_in
from tests.conftest import tiny_config, write_config

LAYERS = 8


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def _full(tokenizer, adapter_layers: list[int] | None = None, seed: int = 0):
    """The tiny 8-layer model, with a LoRA adapter on ``adapter_layers`` when given."""
    model = build_tiny_llama(len(tokenizer), seed=seed, num_layers=LAYERS)
    model.requires_grad_(False)
    if adapter_layers is None:
        return model
    return attach_adapter(model, PeftConfig(r=4, alpha=8, dropout=0.0), seed=1, layers=adapter_layers)


# ------------------------------------------------------------------------------------------ layer selection


def test_uniform_layer_drop_matches_offsite_tuning_reference_values() -> None:
    # uniform_choose_layers: idx = round(i * (n - 1) / (k - 1)), Python's round (halves to even).
    assert uniform_choice(6, 3) == [0, 2, 5]  # stride 2.5: 0, round(2.5)=2, round(5.0)=5
    assert uniform_choice(26, 13) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25]  # SmolLM2 at 0.5: stride 25/12
    assert uniform_choice(26, 7) == [0, 4, 8, 12, 17, 21, 25]  # SmolLM2 at 0.25: 6.5 rounds up to 7 kept
    assert uniform_choice(5, 5) == [0, 1, 2, 3, 4]
    assert uniform_choice(7, 1) == [3]


def test_layer_plan_keeps_bottom_top_and_a_uniform_middle() -> None:
    plan = plan_layers(8, 1, 1, 0.5)
    assert plan.bottom == (0,) and plan.top == (7,) and plan.middle == (1, 3, 6)
    assert plan.kept == (0, 1, 3, 6, 7) and plan.dropped == (2, 4, 5)
    assert plan.adapter_layers == [0, 7]
    assert [plan.full_index(i) for i in range(5)] == [0, 1, 3, 6, 7]
    smol = plan_layers(30, 2, 2, 0.25)
    assert smol.kept == (0, 1, 2, 6, 10, 14, 19, 23, 27, 28, 29) and len(smol.dropped) == 19


def test_tiny_aliases_name_their_depth() -> None:
    assert tiny_num_layers("tiny-random-llama") == 2 and tiny_num_layers("tiny-random-llama-8l") == 8
    assert tiny_num_layers("tiny-random-llama-1l") is None and tiny_num_layers("tiny-random-llama-33l") is None
    assert tiny_num_layers("smollm2-135m-instruct") is None


@pytest.mark.parametrize(
    ("n_bottom", "n_top", "keep", "message"),
    [
        (4, 4, 0.5, r"`offsite.n_bottom` \(4\) \+ `offsite.n_top` \(4\) leave no middle layer of the model's 8"),
        (5, 4, 0.5, "leave no middle layer"),
        (3, 3, 0.2, r"`offsite.keep_ratio` 0.2 keeps no middle layer of 2: raise it to at least 0.25"),
    ],
)
def test_layers_that_leave_no_middle_are_refused(n_bottom: int, n_top: int, keep: float, message: str) -> None:
    with pytest.raises(FedlmError, match=message):
        plan_layers(8, n_bottom, n_top, keep)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"offsite": {}}, r"`offsite.n_bottom` \(2\) \+ `offsite.n_top` \(2\) leave no middle layer of the model's 2"),
        ({"model": {"name": "tiny-random-llama-8l"}, "offsite": {"keep_ratio": 1.5}}, "keep_ratio"),
        ({"model": {"name": "tiny-random-llama-8l"}, "offsite": {"n_bottom": 0, "n_top": 0}}, "must be >= 1"),
        ({"model": {"name": "tiny-random-llama-8l"}, "offsite": {}, "federation": {"runtime": "flower"}}, "in-process simulation"),
        ({"model": {"name": "tiny-random-llama-8l"}, "offsite": {}, "peft": {"method": "ia3"}}, "needs `peft.method: lora` or `dora`"),
        ({"model": {"name": "tiny-random-llama-8l"}, "offsite": {}, "personalization": {"method": "finetune"}}, "personalization.method"),
    ],
)
def test_bad_offsite_configs_are_refused_at_load(tmp_path: Path, sections: dict, message: str) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", **sections))
    with pytest.raises(FedlmError, match=message):
        load_config(cfg)


# ------------------------------------------------------------------------------------------ the emulator


def test_the_weights_a_client_receives_hold_no_dropped_layer(tokenizer) -> None:
    plan = plan_layers(LAYERS, 1, 1, 0.5)
    full = _full(tokenizer, plan.adapter_layers)
    emulator = build_emulator(full, plan)
    payload = base_weights(emulator)
    layer_ids = {int(name.split(".layers.")[1].split(".")[0]) for name in payload if ".layers." in name}
    assert layer_ids == set(plan.kept)
    dropped = [t for name, t in base_weights(full).items() if any(f".layers.{i}." in name for i in plan.dropped) and t.dim() == 2]
    assert dropped and not any(torch.equal(t, d) for t in payload.values() for d in dropped if t.shape == d.shape)  # (norms are all ones)
    assert sum(t.numel() for t in payload.values()) < sum(t.numel() for t in base_weights(full).values())
    assert len(list(full.get_base_model().model.layers)) == LAYERS  # the full model is left whole


def test_the_emulator_computes_what_a_plain_llama_of_its_layers_computes(tokenizer) -> None:
    """Reference: transformers' own LlamaForCausalLM with the kept layers renumbered 0..4."""
    plan = plan_layers(LAYERS, 1, 1, 0.5)
    full = _full(tokenizer)
    emulator = build_emulator(full, plan)
    config = LlamaConfig(**{**full.config.to_dict(), "num_hidden_layers": len(plan.kept)})
    reference = LlamaForCausalLM(config)
    renumber = {f"model.layers.{full_idx}.": f"model.layers.{pos}." for pos, full_idx in enumerate(plan.kept)}
    state = {}
    for name, tensor in full.state_dict().items():
        if ".layers." not in name:
            state[name] = tensor
        for old, new in renumber.items():
            if name.startswith(old):
                state[new + name.removeprefix(old)] = tensor
    reference.load_state_dict(state)
    ids = torch.tensor([[5, 70, 80, 90, 100, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(emulator(input_ids=ids).logits, reference.eval()(input_ids=ids).logits, rtol=0, atol=0)
        cached = emulator.generate(ids, max_new_tokens=3, do_sample=False)  # the KV cache follows emulator positions
        assert torch.equal(cached, reference.generate(ids, max_new_tokens=3, do_sample=False))


# ------------------------------------------------------------------------------------------ plug-in


def test_an_emulator_trained_adapter_plugs_into_the_full_model_by_name(tokenizer, tmp_path: Path) -> None:
    plan = plan_layers(LAYERS, 2, 1, 0.5)
    full = _full(tokenizer, plan.adapter_layers)
    emulator = build_emulator(full, plan)
    assert list(trainable_state(emulator)) == list(trainable_state(full))  # identical parameter names, same order
    assert {n.split(".layers.")[1].split(".")[0] for n in trainable_state(full)} == {"0", "1", "7"}
    optimizer = torch.optim.SGD([p for p in emulator.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([[5, 70, 80, 90, 100, 33, 2]])
    for _ in range(2):  # train the adapter on the emulator (B moves off zero)
        optimizer.zero_grad()
        emulator(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    trained = trainable_state(emulator)
    plug_in(full, trained)
    for name, tensor in trainable_state(full).items():
        assert torch.equal(tensor, trained[name])
    full.save_pretrained(str(tmp_path / "adapter"))  # what finish_run saves: loads onto a fresh full base with peft
    reloaded = PeftModel.from_pretrained(_full(tokenizer), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, full.eval()(input_ids=ids).logits)


def test_an_adapter_that_does_not_fit_the_full_model_is_refused_naming_it(tokenizer) -> None:
    plan = plan_layers(LAYERS, 1, 1, 0.5)
    full = _full(tokenizer, plan.adapter_layers)
    state = trainable_state(full)
    first = next(iter(state))
    middle = first.replace(".layers.0.", ".layers.3.")  # an adapter on a middle layer: the full model has none there
    with pytest.raises(FedlmError, match=rf"parameter '{middle}' has no counterpart in the full model"):
        check_plug_in(full, {middle: state[first], **state})
    wider = {**state, first: torch.zeros(8, state[first].shape[1])}
    with pytest.raises(FedlmError, match=rf"'{first}' has shape \(8, 64\), the full model's \(4, 64\)"):
        plug_in(full, wider)
    with pytest.raises(FedlmError, match="lacks the full model's parameter"):
        check_plug_in(full, dict(list(state.items())[1:]))


# ------------------------------------------------------------------------------------------ distillation


def test_middle_output_is_the_hidden_state_entering_the_top_layers(tokenizer) -> None:
    plan = plan_layers(LAYERS, 1, 2, 0.5)
    full = _full(tokenizer)
    batch = {"input_ids": torch.tensor([[5, 70, 80, 90], [0, 0, 33, 2]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])}
    with torch.no_grad():
        reference = full(**batch, output_hidden_states=True).hidden_states[LAYERS - len(plan.top)]  # input of layer 6
        torch.testing.assert_close(middle_output(full, len(plan.top), batch), reference, rtol=0, atol=0)


def test_distillation_moves_only_the_middle_towards_the_full_model(tokenizer) -> None:
    plan = plan_layers(LAYERS, 1, 1, 0.5)
    full = _full(tokenizer, plan.adapter_layers)
    emulator = build_emulator(full, plan)
    public = PublicText.read("embedded:wordnet_text", tokenizer, 48, 4)
    batches = public.batches(1, seed=0) * 6  # one batch six times: its loss must fall
    held_out = public.batches(2, seed=1)
    before_state = {n: t.clone() for n, t in emulator.state_dict().items()}
    before = middle_gap(emulator, full, len(plan.top), held_out, torch.device("cpu"))
    result = distill_middle(emulator, full, plan, batches, lr=3e-3, device=torch.device("cpu"))
    after = middle_gap(emulator, full, len(plan.top), held_out, torch.device("cpu"))
    assert result.steps == 6 and result.last < result.first and after < before
    changed = {n for n, t in emulator.state_dict().items() if not torch.equal(t, before_state[n])}
    assert changed and all(any(f".layers.{i}." in n for i in plan.middle) for n in changed)
    assert not any(".lora_" in n for n in changed)
    assert [n for n, p in emulator.named_parameters() if p.requires_grad] == [n for n, p in full.named_parameters() if p.requires_grad]
    load_trainable_state(emulator, trainable_state(full))  # still takes the global adapter


# ------------------------------------------------------------------------------------------ end to end


def test_offsite_run_from_the_cli_reports_bytes_gap_and_saves_a_full_model_adapter(tmp_path: Path, runner, one_torch_thread) -> None:
    config = tiny_config(
        tmp_path / "run",
        model={"name": "tiny-random-llama-6l"},
        federation={"rounds": 2, "clients_per_round": 2, "local_steps": 1, "batch_size": 2},
        eval={"max_examples": 8, "max_new_tokens": 2, "batch_size": 8, "every": 0, "at_start": False},
        offsite={"n_bottom": 1, "n_top": 1, "keep_ratio": 0.5, "emulator_distill_steps": 2, "align_steps": 1, "distill_batch_size": 2},
    )
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in records if r.get("split") == "offsite")
    assert summary["kept_layers"] == [0, 1, 4, 5] and summary["dropped_layers"] == [2, 3]
    assert summary["middle_bytes"] < summary["emulator_bytes"] < summary["full_bytes"]
    rounds = [r for r in records if r.get("split") == "aggregate"]
    assert [r["offsite"]["model_download_bytes"] for r in rounds][0] == 2 * summary["emulator_bytes"]
    assert all(r["offsite"]["align_steps"] == 1 for r in rounds)
    emulator = [r for r in records if r.get("split") == "emulator_test"]
    assert [r["round"] for r in emulator] == [2]  # with every evaluation of the full model
    assert emulator[-1]["plugin_gap"] == pytest.approx(emulator[-1]["loss"] - emulator[-1]["full_loss"])
    final = next(r for r in records if r.get("split") == "global_test" and r["round"] == 2)
    assert emulator[-1]["full_loss"] == final["loss"]
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [0, 5]


def test_distillation_in_bfloat16_keeps_small_steps_in_float32_masters(tokenizer) -> None:
    """AdamW's ~lr steps (1e-5) are below bfloat16's spacing at most of these weights: stepping the bfloat16 weights
    themselves moves them 0.2x as far as in float32 (measured); with float32 masters 0.7x."""
    plan = plan_layers(LAYERS, 1, 1, 0.5)
    batches = PublicText.read("embedded:wordnet_text", tokenizer, 32, 2).batches(1, seed=0) * 4
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        full = _full(tokenizer).to(dtype)
        emulator = build_emulator(full, plan)
        weight = emulator.model.layers[2].mlp.up_proj.weight  # full-model layer 3, in the middle
        start = weight.detach().to(torch.float32).clone()
        distill_middle(emulator, full, plan, batches, lr=1e-5, device=torch.device("cpu"))
        moved[dtype] = (weight.detach().to(torch.float32) - start).abs().mean().item()
    assert moved[torch.float32] > 0 and moved[torch.bfloat16] > 0.5 * moved[torch.float32]


def test_resuming_a_fedbiot_run_is_refused(tokenizer) -> None:
    """The checkpoints keep the adapter, not the re-aligned emulator: a resumed run would train on another one."""
    plan = plan_layers(LAYERS, 1, 1, 0.5)
    full = _full(tokenizer, plan.adapter_layers)
    public = PublicText(["some public text"], tokenizer, 16, 1)
    alignment = EmulatorAlignment(build_emulator(full, plan), full, plan, public, 1, 1e-4, 0, torch.device("cpu"))
    alignment.on_start(trainable_state(full), 0)
    with pytest.raises(FedlmError, match="--resume: `offsite.align_steps` > 0"):
        alignment.on_start(trainable_state(full), 3)
