"""Sample-level DP-SGD (``privacy.sample_dp``; Abadi et al. 2016, Algorithm 1) against plain PyTorch loops,
Opacus's own accountant, and runs on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, write_config
from peft import LoraConfig, get_peft_model

from fedlm.aggregation.fedprox import ProximalHook
from fedlm.cli import app
from fedlm.config import PeftConfig
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.core.sampling import sample_clients
from fedlm.core.task import LocalPlan
from fedlm.data.collate import collate_for_loss
from fedlm.data.formats import to_messages
from fedlm.data.readers import read_records
from fedlm.data.tokenize import tokenize_conversation
from fedlm.federation.trainer import ClientTrainer
from fedlm.models.adapters import attach_adapter, named_trainable_parameters, trainable_state
from fedlm.models.tiny import build_byte_tokenizer, build_tiny_llama
from fedlm.privacy.accounting import epsilon
from fedlm.privacy.sample_dp import SampleDP, poisson_batches, privatise

pytestmark = pytest.mark.usefixtures("one_torch_thread")
B = 6


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_byte_tokenizer()
    records = read_records("embedded:wordnet_defs")[:12]
    examples = [tokenize_conversation(tokenizer, to_messages(r, "alpaca", None, "x"), 96) for r in records]
    return tokenizer, examples


def _start(model) -> dict[str, torch.Tensor]:
    """A non-trivial starting adapter (B != 0, so every LoRA factor has a gradient)."""
    state = trainable_state(model)
    gen = torch.Generator().manual_seed(3)
    return {n: 0.05 * torch.randn(t.shape, generator=gen) for n, t in sorted(state.items())}


def _fedlm_model(tokenizer):
    return attach_adapter(build_tiny_llama(len(tokenizer), seed=1), PeftConfig(r=4, alpha=8, dropout=0.0), seed=5)


def _plain_model(tokenizer, start):
    """The reference: peft + the tiny Llama, nothing from fedlm's trainer or privacy code."""
    ref = get_peft_model(
        build_tiny_llama(len(tokenizer), seed=1),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    named = {n.replace(".default", ""): p for n, p in ref.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(start[name])
    return ref, named


def _example_gradients(ref, named, tokenizer, lot) -> list[dict[str, torch.Tensor]]:
    """g_i: one forward/backward per example alone, loss = mean cross-entropy over its response tokens."""
    grads = []
    for ex in lot:
        b = collate_for_loss([ex], tokenizer.pad_token_id)
        logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], b["labels"][0, 1:], ignore_index=-100)
        ref.zero_grad()
        loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in named.items()})
    return grads


def _clipped_mean(grads: list[dict[str, torch.Tensor]], clip: float, lot_size: float) -> dict[str, torch.Tensor]:
    """(1/L) sum_i g_i / max(1, ||g_i|| / C), by hand."""
    total = {n: torch.zeros_like(t) for n, t in grads[0].items()}
    for g in grads:
        norm = torch.sqrt(sum((t**2).sum() for t in g.values()))
        for n, t in g.items():
            total[n] += t / max(1.0, float(norm) / clip)
    return {n: t / lot_size for n, t in total.items()}


def _dp_gradient(tokenizer, examples, start, sigma: float, clip: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """One DP-SGD gradient of fedlm (Opacus per-sample gradients + privatise) on the first B examples."""
    model = _fedlm_model(tokenizer)
    from fedlm.models.adapters import load_trainable_state

    load_trainable_state(model, start)
    model.train()
    named = named_trainable_parameters(model)
    dp = SampleDP(sigma, clip, 1e-5)
    with dp.privatiser(model, batch_size=B, num_examples=len(examples), seed=seed) as privatiser:
        privatiser.backward(named, collate_for_loss(examples[:B], tokenizer.pad_token_id))
    out = {n: p.grad.detach().clone() for n, p in named.items()}
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus's hooks and attributes are gone
    return out


def test_one_step_equals_clipped_per_example_gradients_of_a_plain_loop(setup) -> None:
    tokenizer, examples = setup
    ref, named = _plain_model(tokenizer, start := _start(_fedlm_model(tokenizer)))
    grads = _example_gradients(ref, named, tokenizer, examples[:B])
    norms = sorted(float(torch.sqrt(sum((t**2).sum() for t in g.values()))) for g in grads)
    clip = norms[B // 2]  # about half the examples are clipped, half are not
    assert norms[0] < clip < norms[-1]
    expected = _clipped_mean(grads, clip, B)
    got = _dp_gradient(tokenizer, examples, start, sigma=0.0, clip=clip)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    assert any(t.abs().max() > 0 for t in got.values())


def test_a_tiny_clip_clips_every_example(setup) -> None:
    tokenizer, examples = setup
    clip = 1e-4
    got = _dp_gradient(tokenizer, examples, _start(_fedlm_model(tokenizer)), sigma=0.0, clip=clip)
    summed = B * torch.sqrt(sum((t**2).sum() for t in got.values()))
    assert 0 < summed <= B * clip * (1 + 1e-5)
    # and privatise's clipping rule on known norms: g / max(1, ||g|| / C)
    per_sample = {"w": torch.tensor([[0.3, 0.4], [1.2, 1.6], [6.0, 8.0]])}  # norms 0.5, 2, 10
    out = privatise(per_sample, max_grad_norm=1.0, noise_multiplier=0.0, lot_size=1.0, generator=torch.Generator())
    torch.testing.assert_close(out["w"], torch.tensor([0.3 + 0.6 + 0.6, 0.4 + 0.8 + 0.8]))


def test_noise_std_per_coordinate_is_sigma_c_over_b(setup) -> None:
    tokenizer, examples = setup
    start, sigma, clip = _start(_fedlm_model(tokenizer)), 2.0, 0.5
    clean = _dp_gradient(tokenizer, examples, start, sigma=0.0, clip=clip)
    noisy = _dp_gradient(tokenizer, examples, start, sigma=sigma, clip=clip)
    noise = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    assert noise.numel() > 3000
    assert float(noise.std()) == pytest.approx(sigma * clip / B, rel=0.04)  # 10% off would fail
    assert abs(float(noise.mean())) < 4 * sigma * clip / B / noise.numel() ** 0.5
    again = _dp_gradient(tokenizer, examples, start, sigma=sigma, clip=clip)
    other = _dp_gradient(tokenizer, examples, start, sigma=sigma, clip=clip, seed=1)
    assert all(torch.equal(noisy[n], again[n]) for n in noisy)  # seeded: replays exactly
    assert not all(torch.equal(noisy[n], other[n]) for n in noisy)


def test_poisson_lots_are_seeded_bernoulli_draws() -> None:
    lots = poisson_batches(200, 400, 10, seed=4)
    assert lots == poisson_batches(200, 400, 10, seed=4)
    sizes = torch.tensor([len(lot) for lot in lots], dtype=torch.float64)
    assert float(sizes.mean()) == pytest.approx(10.0, rel=0.05)  # E|lot| = q n = batch_size
    assert float(sizes.var()) == pytest.approx(200 * 0.05 * 0.95, rel=0.2)  # binomial, not fixed-size
    assert poisson_batches(3, 5, 8, seed=0) == [[0, 1, 2]] * 5  # q capped at 1


def test_epsilon_matches_opacus_rdp_accountant() -> None:
    from opacus.accountants import RDPAccountant

    dp = SampleDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    ours = dp.epsilon_spent("c", round_num=10, steps_per_round=100, batch_size=1, num_examples=100)  # q 0.01, 1000 steps
    reference = RDPAccountant()
    reference.history = [(1.0, 0.01, 1000)]
    assert ours == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-2)
    mnist = RDPAccountant()  # Opacus's MNIST example: sigma 1.1, batch 256 of 60000, 60 epochs
    mnist.history = [(1.1, 256 / 60000, 60000 // 256 * 60)]
    assert epsilon(1.1, 256 / 60000, 60000 // 256 * 60, 1e-5) == pytest.approx(mnist.get_epsilon(delta=1e-5), rel=1e-2)


def test_epsilon_counts_only_the_rounds_a_client_was_sampled_in() -> None:
    names = tuple(f"c{i}" for i in range(6))
    dp = SampleDP(1.0, 1.0, 1e-5, client_names=names, clients_per_round=2, seed=3)
    joined = sum("c0" in sample_clients(names, 2, 3, r) for r in range(1, 9))
    assert 0 < joined < 8
    assert dp.rounds_joined("c0", 8) == joined
    assert dp.epsilon_spent("c0", 8, 5, 4, 40) == pytest.approx(epsilon(1.0, 0.1, 5 * joined, 1e-5))
    assert SampleDP(1.0, 1.0, 1e-5).rounds_joined("c0", 8) == 8  # no sampling known: every round (an upper bound)


def test_trainer_steps_are_dp_sgd_with_fedprox_after_the_noise(setup) -> None:
    """Two SGD steps of the trainer (sigma 0, Poisson lots, FedProx) against the plain loop; its batch-level
    ``max_grad_norm`` is ignored under DP-SGD."""
    tokenizer, examples = setup
    lrs, batch, seed, clip, mu = [0.5, 0.4], 4, 11, 0.05, 0.3
    model = _fedlm_model(tokenizer)
    start = _start(model)
    dp = SampleDP(0.0, clip, 1e-5)
    trainer = ClientTrainer(model, tokenizer.pad_token_id, torch.device("cpu"), 0.0, 1e-6, [ProximalHook(mu)], "sgd", dp)
    update = trainer.train("c", examples, start, LocalPlan(round=1, lrs=lrs, batch_size=batch, seed=seed))
    assert update.metrics["sample_epsilon"] == float("inf")  # sigma 0: no privacy

    ref, named = _plain_model(tokenizer, start)
    for lr, ids in zip(lrs, poisson_batches(len(examples), len(lrs), batch, seed)):
        lot = [examples[i] for i in ids]
        grad = _clipped_mean(_example_gradients(ref, named, tokenizer, lot), clip, batch) if lot else None
        with torch.no_grad():
            for n, p in named.items():
                g = (grad[n] if grad is not None else torch.zeros_like(p)) + mu * (p - start[n])
                p -= lr * g
    for n, p in named.items():
        torch.testing.assert_close(start[n] + update.tensors[n], p.detach(), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ runs

FED = {"rounds": 3, "clients_per_round": None, "local_steps": 1, "batch_size": 4}
SMALL = {
    "partition": {"method": "iid", "num_clients": 2, "field": None},
    "data": {"max_train_examples": 40, "max_length": 96},
    "eval": {"every": 0, "at_start": False, "generate": False, "max_examples": 4},
}


def _config(root: Path, sample_dp: dict[str, Any], **federation: Any) -> dict[str, Any]:
    return tiny_config(root, privacy={"sample_dp": sample_dp}, federation={**FED, **federation}, **SMALL)


def _run(runner, root: Path, config: dict[str, Any]) -> list[dict]:
    result = runner.invoke(app, ["run", str(write_config(root.parent / f"{root.name}.yaml", config))])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_each_clients_epsilon_growing_over_rounds(runner, tmp_path: Path) -> None:
    records = _run(runner, tmp_path / "run", _config(tmp_path / "run", {"noise_multiplier": 1.0, "max_grad_norm": 1.0}))
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 6
    for client in {r["client"] for r in train}:
        mine = [r for r in train if r["client"] == client]
        eps = [r["sample_epsilon"] for r in mine]
        assert eps[0] < eps[1] < eps[2]
        n = mine[0]["num_examples"]
        assert eps == pytest.approx([epsilon(1.0, 4 / n, t, 1e-5) for t in (1, 2, 3)], rel=1e-9)


def test_a_target_epsilon_is_met_by_the_worst_client(runner, tmp_path: Path) -> None:
    records = _run(runner, tmp_path / "run", _config(tmp_path / "run", {"target_epsilon": 4.0}, rounds=2))
    last = [r for r in records if r["split"] == "train" and r["round"] == 2]
    worst = max(r["sample_epsilon"] for r in last)
    assert 0.97 * 4.0 <= worst <= 4.0


def test_an_unreachable_target_is_refused_before_training(runner, tmp_path: Path) -> None:
    path = write_config(tmp_path / "run.yaml", _config(tmp_path / "run", {"target_epsilon": 1e-6}))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "`privacy.sample_dp.target_epsilon`" in result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "sample_dp, sections, message",
    [
        ({"noise_multiplier": 1.0}, {"aggregation": {"name": "scaffold"}}, "`aggregation.option: I`"),
        ({"noise_multiplier": 1.0, "target_epsilon": 2.0}, {}, "exactly one"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, {}, "`privacy.sample_dp.max_grad_norm`"),
    ],
)
def test_bad_sample_dp_settings_are_refused_at_load(tmp_path: Path, sample_dp: dict, sections: dict, message: str) -> None:
    with pytest.raises(FedlmError, match=message) as info:
        validate_config(tiny_config(tmp_path, privacy={"sample_dp": sample_dp}, **sections))
    assert "privacy.sample_dp" in str(info.value)


def test_scaffold_option_ii_and_fedprox_are_accepted(tmp_path: Path) -> None:
    for aggregation, optimizer in (({"name": "scaffold", "option": "II"}, "sgd"), ({"name": "fedprox", "mu": 0.1}, "adamw")):
        config = tiny_config(tmp_path, privacy={"sample_dp": {"noise_multiplier": 1.0}}, aggregation=aggregation, federation={"optimizer": optimizer})
        assert validate_config(config).privacy.sample_dp is not None
