"""Generation under the mixes: greedy tokens equal Hugging Face ``generate`` on peft's own adapter (and the ``cat``
merge for the adapter mix); the logits mix equals a cache-free reference loop; stop strings, streaming, sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from inference_fixtures import add_clients, tiny_run
from peft import PeftModel

from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.inference.generate import SamplingParams, chat_prompt, generate
from fedlm.inference.mix import MixedModel, MixSpec
from fedlm.inference.run import open_run
from fedlm.models.loading import load_base_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUESTIONS = ["What is a cat?", "Name three colours, please, in a list."]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> MixedModel:
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("genrun")
    run_dir = tiny_run(root, CliRunner())
    add_clients(run_dir, "replace")
    return MixedModel(open_run(run_dir))


def _peft(run_dir: Path, adapters: dict[str, Path], weights: list[float] | None = None) -> PeftModel:
    run = open_run(run_dir)
    loaded = load_base_model(run.config.model, seed=derive_seed(run.config.seed, "base-init") % 2**31)
    names = list(adapters)
    model = PeftModel.from_pretrained(loaded.model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    if weights is not None:
        model.add_weighted_adapter(names, weights, "merged", combination_type="cat")
        model.set_adapter("merged")
    return model.eval()


def _hf_greedy(model: PeftModel, mixed: MixedModel, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    tok = mixed.run.tokenizer
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
    return rows


@pytest.mark.parametrize("mix", ["global", "local", "adapter"])
def test_greedy_equals_transformers_generate(mixed: MixedModel, mix: str) -> None:
    root = mixed.run.root
    prompts = [chat_prompt(mixed.run.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    adapters = {"global": root / "adapter", "alice": root / "clients" / "alice" / "adapter"}
    reference = {
        "global": lambda: _peft(root, {"global": adapters["global"]}),
        "local": lambda: _peft(root, {"alice": adapters["alice"]}),
        "adapter": lambda: _peft(root, adapters, [0.6, 0.4]),
    }[mix]()
    expected = _hf_greedy(reference, mixed, prompts, 12)
    got = generate(mixed, MixSpec(mix=mix, client="alice", weight=0.4), prompts, [SamplingParams(max_tokens=12)] * 2)  # type: ignore[arg-type]
    assert [r.token_ids for r in got] == expected
    assert all(r.finish_reason == ("length" if len(e) == 12 else "stop") for r, e in zip(got, expected))


def test_logits_mix_equals_cache_free_reference(mixed: MixedModel) -> None:
    root = mixed.run.root
    glob = _peft(root, {"global": root / "adapter"})
    local = _peft(root, {"alice": root / "clients" / "alice" / "adapter"})
    prompt = chat_prompt(mixed.run.tokenizer, [{"role": "user", "content": QUESTIONS[0]}])
    for combine in ("linear", "product"):
        ids = list(prompt)
        expected = []
        with torch.no_grad():
            for _ in range(8):
                lg = torch.log_softmax(glob(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
                ll = torch.log_softmax(local(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
                mixed_lp = torch.log(0.3 * ll.exp() + 0.7 * lg.exp()) if combine == "linear" else 0.3 * ll + 0.7 * lg
                token = int(mixed_lp.argmax())
                if token == mixed.run.tokenizer.eos_token_id:
                    break
                expected.append(token)
                ids.append(token)
        got = generate(mixed, MixSpec(mix="logits", client="alice", weight=0.3, combine=combine), [prompt], [SamplingParams(max_tokens=8)])  # type: ignore[arg-type]
        assert got[0].token_ids == expected, combine


def test_stop_strings_streaming_and_sampling(mixed: MixedModel) -> None:
    prompt = chat_prompt(mixed.run.tokenizer, [{"role": "user", "content": QUESTIONS[1]}])
    spec = MixSpec(mix="local", client="bob")
    full = generate(mixed, spec, [prompt], [SamplingParams(max_tokens=20)])[0]
    assert len(full.text) >= 6
    stop = full.text[3:5]
    pieces: list[str] = []
    cut = generate(mixed, spec, [prompt], [SamplingParams(max_tokens=20, stop=(stop,))], lambda _r, t: pieces.append(t))[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text  # the stream never showed the stop string
    streamed: list[str] = []
    whole = generate(mixed, spec, [prompt], [SamplingParams(max_tokens=20)], lambda _r, t: streamed.append(t))[0]
    assert "".join(streamed) == whole.text == full.text
    sampled = [generate(mixed, spec, [prompt], [SamplingParams(max_tokens=10, temperature=1.0, seed=s)])[0].token_ids for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]  # seeded sampling is reproducible, and samples
    nucleus = generate(mixed, spec, [prompt], [SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=3)])[0]
    assert nucleus.token_ids == full.token_ids[:10]  # a vanishing nucleus keeps only the argmax


def test_batch_rows_equal_single_rows(mixed: MixedModel) -> None:
    """Left padding does not change an answer: each row of a batch equals its answer alone, auto weight included."""
    spec = MixSpec(mix="adapter", client="alice", weight="auto")
    prompts = [chat_prompt(mixed.run.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    together = generate(mixed, spec, prompts, [SamplingParams(max_tokens=10)] * 2)
    alone = [generate(mixed, spec, [p], [SamplingParams(max_tokens=10)])[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_rows_of_different_clients_and_mixes_share_a_batch(mixed: MixedModel) -> None:
    """One batch of rows for different clients and mixes answers each row as it would be answered alone."""
    specs = [
        MixSpec(mix="local", client="alice"),
        MixSpec(mix="global"),
        MixSpec(mix="adapter", client="bob", weight="auto"),
        MixSpec(mix="local", client="bob"),
        MixSpec(mix="adapter", client="alice", weight=0.25),
    ]
    prompts = [chat_prompt(mixed.run.tokenizer, [{"role": "user", "content": QUESTIONS[i % 2]}]) for i in range(len(specs))]
    assert len({mixed.batch_key(s) for s in specs}) == 1
    together = generate(mixed, specs, prompts, [SamplingParams(max_tokens=8)] * len(specs))
    alone = [generate(mixed, s, [p], [SamplingParams(max_tokens=8)])[0] for s, p in zip(specs, prompts)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    logit_specs = [MixSpec(mix="logits", client="alice", weight=0.3), MixSpec(mix="logits", client="bob", weight="auto")]
    together = generate(mixed, logit_specs, prompts[:2], [SamplingParams(max_tokens=8)] * 2)
    alone = [generate(mixed, s, [p], [SamplingParams(max_tokens=8)])[0] for s, p in zip(logit_specs, prompts[:2])]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_soft_prompt_client_equals_peft_prompt_tuning(mixed: MixedModel, tmp_path: Path) -> None:
    """A ``combine: prompt`` client answers as peft's prompt tuning over the merged adapter (the personalization's
    own loading recipe), alone and in a batch with other clients' rows; its logits mix equals the closed form."""
    import shutil

    from inference_fixtures import add_prompt_client

    run_dir = tmp_path / "run"
    shutil.copytree(mixed.run.root, run_dir)
    add_prompt_client(run_dir)
    with_prompt = MixedModel(open_run(run_dir))
    prompts = [chat_prompt(with_prompt.run.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    run = with_prompt.run
    loaded = load_base_model(run.config.model, seed=derive_seed(run.config.seed, "base-init") % 2**31)
    merged = PeftModel.from_pretrained(loaded.model, str(run_dir / "clients" / "carol" / "adapter")).merge_and_unload()
    reference = PeftModel.from_pretrained(merged, str(run_dir / "clients" / "carol" / "prompt")).eval()
    expected = _hf_greedy(reference, with_prompt, prompts, 10)
    got = generate(with_prompt, MixSpec(mix="local", client="carol"), prompts, [SamplingParams(max_tokens=10)] * 2)
    assert [r.token_ids for r in got] == expected
    plain = generate(with_prompt, MixSpec(mix="global"), prompts, [SamplingParams(max_tokens=10)] * 2)
    assert [r.token_ids for r in plain] != expected  # the soft prompt changes the answers
    specs = [MixSpec(mix="local", client="carol"), MixSpec(mix="local", client="alice"), MixSpec(mix="global")]
    rows = [prompts[0], prompts[1], prompts[1]]
    together = generate(with_prompt, specs, rows, [SamplingParams(max_tokens=10)] * 3)
    alone = [generate(with_prompt, s, [p], [SamplingParams(max_tokens=10)])[0] for s, p in zip(specs, rows)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    ids = torch.tensor([prompts[0]])
    mask = torch.ones_like(ids)
    labels = ids.clone()
    logp = with_prompt.token_logprobs(MixSpec(mix="logits", client="carol", weight=0.4), ids, mask, labels)
    with torch.no_grad():
        lp_local = torch.log_softmax(reference(input_ids=ids, attention_mask=mask).logits[:, 4:].float(), -1)  # after the 4 virtual tokens
        lp_global = torch.log_softmax(_peft(run_dir, {"global": run_dir / "adapter"})(input_ids=ids).logits.float(), -1)
    mix = torch.log(0.4 * lp_local.exp() + 0.6 * lp_global.exp())
    want = mix[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp[:, 1:], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(FedlmError, match="soft prompt.*--mix local"):
        with_prompt.check(MixSpec(mix="adapter", client="carol"))
