"""The four inference mixes against references nobody here wrote: peft's own single-adapter models and its ``cat``
merge (``add_weighted_adapter``) for the adapter mix, closed forms for the logits mixes and the auto weight."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from inference_fixtures import CLIENT_TEXTS, DUAL_GLOBAL_WEIGHT, add_clients, tiny_run
from peft import PeftModel

from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.data.collate import collate_prompts
from fedlm.inference.mix import MixedModel, MixSpec, mix_logprobs
from fedlm.inference.run import open_run
from fedlm.inference.weighting import mean_pooled_hidden
from fedlm.models.loading import load_base_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from typer.testing import CliRunner

    return tiny_run(tmp_path_factory.mktemp("mixrun"), CliRunner())


def _run_with_clients(base_run: Path, tmp_path: Path, combine: str) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    add_clients(run_dir, combine)
    return run_dir


def _batch(run) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    texts = ["Hello there, how are you?", "The cat sat."]
    ids = [run.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = collate_prompts(ids, run.tokenizer.pad_token_id)  # left-padded
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[:, :3] = -100  # a prompt part that the auto weight reads
    return {**batch, "labels": labels}


def _reference_logprobs(run_dir: Path, adapters: list[str], weights: list[float] | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log-softmax logits of a fresh base with ``adapters`` loaded by peft (merged with ``cat`` when ``weights``)."""
    run = open_run(run_dir)
    loaded = load_base_model(run.config.model, seed=derive_seed(run.config.seed, "base-init") % 2**31)
    paths = {"global": run_dir / "adapter", **{f"client/{c}": run_dir / "clients" / c / "adapter" for c in run.clients}}
    model = PeftModel.from_pretrained(loaded.model, str(paths[adapters[0]]), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.load_adapter(str(paths[name]), adapter_name=name)
    if weights is not None:
        model.add_weighted_adapter(adapters, weights, "merged", combination_type="cat")
        model.set_adapter("merged")
    else:
        model.set_adapter(adapters[0])
    model.eval()
    positions = (batch["attention_mask"].cumsum(-1) - 1).masked_fill(batch["attention_mask"] == 0, 1)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions).logits
    return torch.log_softmax(logits.float(), -1)


def _picked(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    picked = logp[:, :-1].gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(labels[:, 1:] == -100, torch.zeros_like(picked), picked)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


@pytest.mark.parametrize("combine", ["replace", "dual"])
def test_mixes_match_peft_and_closed_forms(base_run: Path, tmp_path: Path, combine: str) -> None:
    run_dir = _run_with_clients(base_run, tmp_path, combine)
    mixed = MixedModel(open_run(run_dir))
    batch = _batch(mixed.run)
    labels = batch["labels"]
    w = 0.3

    def score(mix: str, **kw: object) -> torch.Tensor:
        return mixed.token_logprobs(MixSpec(mix=mix, client="alice", **kw), batch["input_ids"], batch["attention_mask"], labels)  # type: ignore[arg-type]

    ref_global = _reference_logprobs(run_dir, ["global"], None, batch)
    ref_alone = _reference_logprobs(run_dir, ["client/alice"], None, batch)
    if combine == "replace":
        ref_local = ref_alone
    else:  # FedDPA's personal model at the run's fixed weight on the global adapter
        ref_local = _reference_logprobs(run_dir, ["global", "client/alice"], [DUAL_GLOBAL_WEIGHT, 1 - DUAL_GLOBAL_WEIGHT], batch)
    ref_adapter = _reference_logprobs(run_dir, ["global", "client/alice"], [1 - w, w], batch)
    torch.testing.assert_close(score("global"), _picked(ref_global, labels), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score("local"), _picked(ref_local, labels), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score("adapter", weight=w), _picked(ref_adapter, labels), atol=1e-4, rtol=1e-4)
    assert (score("local") - score("global")).abs().max() > 1e-2  # the personal model really differs
    linear = torch.log(w * ref_local.exp() + (1 - w) * ref_global.exp())
    torch.testing.assert_close(score("logits", weight=w), _picked(linear, labels), atol=1e-5, rtol=1e-5)
    product = torch.log_softmax(w * ref_local + (1 - w) * ref_global, -1)
    torch.testing.assert_close(score("logits", weight=w, combine="product"), _picked(product, labels), atol=1e-5, rtol=1e-5)
    # the end points of the weight are the two models
    torch.testing.assert_close(score("adapter", weight=0.0), score("global"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score("adapter", weight=1.0), _picked(ref_alone, labels), atol=1e-5, rtol=1e-5)
    loss = mixed.loss(MixSpec(mix="local", client="alice"), batch)
    torch.testing.assert_close(loss, -score("local").sum() / (labels[:, 1:] != -100).sum())


def test_auto_weight_is_scaled_cosine_to_the_centroid(base_run: Path, tmp_path: Path) -> None:
    run_dir = _run_with_clients(base_run, tmp_path, "replace")
    mixed = MixedModel(open_run(run_dir))
    batch = _batch(mixed.run)
    pooled = mean_pooled_hidden(mixed.model, batch["input_ids"], batch["attention_mask"])
    centroid = mixed.run.clients["alice"].centroid
    assert centroid is not None
    expected = 0.8 * torch.nn.functional.cosine_similarity(pooled, centroid.unsqueeze(0), dim=-1).clamp(min=0)
    got = mixed.personal_weights(MixSpec(mix="adapter", client="alice", weight="auto", max_weight=0.8), batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got, expected)
    # an input equal to the client's own data gets max_weight; the opposite direction gets 0
    object.__setattr__(mixed.run.clients["alice"], "centroid", pooled[0].clone())
    got = mixed.personal_weights(MixSpec(mix="logits", client="alice", weight="auto", max_weight=0.8), batch["input_ids"], batch["attention_mask"])
    assert got[0].item() == pytest.approx(0.8, abs=1e-5)
    object.__setattr__(mixed.run.clients["alice"], "centroid", -pooled[0].clone())
    got = mixed.personal_weights(MixSpec(mix="logits", client="alice", weight="auto"), batch["input_ids"], batch["attention_mask"])
    assert got[0].item() == 0.0


def test_request_pooling_is_the_profile_statistic(base_run: Path) -> None:
    """A left-padded batch of requests pools as the personalization's profile does (right-padded, its own code)."""
    from fedlm.personalization.profile import embed_prompts

    run = open_run(base_run)
    ids = [run.tokenizer(t, add_special_tokens=False)["input_ids"] for t in CLIENT_TEXTS["alice"] + CLIENT_TEXTS["bob"]]
    batch = collate_prompts(ids, run.tokenizer.pad_token_id)
    mine = mean_pooled_hidden(run.model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(mine, embed_prompts(run.model, run.tokenizer, ids, run.device), atol=1e-5, rtol=1e-5)


def test_mix_logprobs_closed_form() -> None:
    local = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), -1)
    global_ = torch.log_softmax(torch.tensor([[3.0, 0.0, 1.0]]), -1)
    w = torch.tensor([0.25])
    expected = 0.25 * local.exp() + 0.75 * global_.exp()
    torch.testing.assert_close(mix_logprobs(local, global_, w, "linear").exp(), expected)
    product = local.exp() ** 0.25 * global_.exp() ** 0.75
    torch.testing.assert_close(mix_logprobs(local, global_, w, "product").exp(), product / product.sum())


def test_refusals_name_the_client_and_the_fix(base_run: Path, tmp_path: Path) -> None:
    mixed = MixedModel(open_run(base_run))
    with pytest.raises(FedlmError, match=r"client 'alice'.*no personal adapters.*--mix global"):
        mixed.check(MixSpec(mix="local", client="alice"))
    with pytest.raises(FedlmError, match="needs a client"):
        mixed.check(MixSpec(mix="logits"))
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    add_clients(run_dir, profiles=False)
    mixed = MixedModel(open_run(run_dir))
    with pytest.raises(FedlmError, match="unknown client 'carol'.*alice, bob"):
        mixed.check(MixSpec(mix="local", client="carol"))
    with pytest.raises(FedlmError, match=r"weight: auto.*client 'alice'.*profile"):
        mixed.check(MixSpec(mix="adapter", client="alice", weight="auto"))
