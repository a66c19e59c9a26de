"""The ownership watermark's closed-form parts: the binomial test, the key-derived trigger sets, the null
distribution of a model that does not know the key, a clean model at chance, pruning, and the config's refusals."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fedlm.config.io import validate_config
from fedlm.config.schema import ModelConfig, PeftConfig
from fedlm.core.errors import FedlmError
from fedlm.models.adapters import attach_adapter
from fedlm.models.loading import load_base_model
from fedlm.watermark.removal import prune_state
from fedlm.watermark.stats import binomial_tail
from fedlm.watermark.trace import Trace
from fedlm.watermark.triggers import CANDIDATES, SHARED, client_label, trigger_set
from fedlm.watermark.verify import Verification, verify_model

K = len(CANDIDATES)


def test_binomial_tail_by_hand() -> None:
    assert binomial_tail(2, 3, Fraction(1, 2)) == 0.5  # (3 + 1) / 8
    assert binomial_tail(0, 7, 0.1) == 1.0
    assert binomial_tail(8, 7, 0.1) == 0.0
    assert binomial_tail(5, 5, Fraction(1, 10)) == pytest.approx(1e-5, rel=1e-12)
    assert binomial_tail(1, 4, Fraction(1, 10)) == pytest.approx(1 - 0.9**4, rel=1e-12)


def test_binomial_tail_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for n in (1, 8, 64, 200):
        for k in range(0, n + 1, max(1, n // 9)):
            assert binomial_tail(k, n, Fraction(1, K)) == pytest.approx(stats.binom.sf(k - 1, n, 1 / K), rel=1e-9, abs=1e-300)


def test_triggers_are_a_function_of_key_label_and_index() -> None:
    first = trigger_set("k3y", SHARED, 12)
    assert first == trigger_set("k3y", SHARED, 12)
    assert trigger_set("k3y", SHARED, 5) == first[:5]  # trigger i does not depend on the set's size
    assert len({t.prompt for t in first}) == 12
    others = [trigger_set("other", SHARED, 12), trigger_set("k3y", client_label("a"), 12), trigger_set("k3y", client_label("b"), 12)]
    for other in others:
        assert not {t.prompt for t in other} & {t.prompt for t in first}
    with pytest.raises(FedlmError, match="secret is empty"):
        trigger_set("", SHARED, 1)


def test_answers_are_uniform_on_the_candidates() -> None:
    """Pearson's chi-square of 2000 answers over K = 10 cells stays below the 0.001 critical value (27.88, 9 df)."""
    targets = [t.target for t in trigger_set("uniformity", SHARED, 2000)]
    counts = [targets.count(j) for j in range(K)]
    expected = len(targets) / K
    assert sum((c - expected) ** 2 / expected for c in counts) < 27.88


def test_a_model_without_the_key_is_right_binomially_often() -> None:
    """Whatever a keyless model answers (here always candidate 3, or a function of the prompt), the number right
    over n triggers is Binomial(n, 1/K): over 400 keys its mean and tail match the closed form."""
    n, keys = 10, 400
    for answer in (lambda prompt: 3, lambda prompt: len(prompt) % K):
        right = [sum(answer(t.prompt) == t.target for t in trigger_set(f"key-{i}", SHARED, n)) for i in range(keys)]
        assert sum(right) / keys == pytest.approx(n / K, abs=0.15)  # sd of the mean: 0.95 / sqrt(400) = 0.047
        tail = sum(r >= 3 for r in right) / keys
        assert tail == pytest.approx(binomial_tail(3, n, Fraction(1, K)), abs=0.04)  # 0.0702, sd 0.013


def test_a_clean_model_scores_at_chance(one_torch_thread) -> None:
    loaded = load_base_model(ModelConfig(name="tiny-random-llama", dtype="float32"))
    model = attach_adapter(loaded.model, PeftConfig(r=4, alpha=8), seed=1)
    result = verify_model(model, loaded.tokenizer, loaded.device, "never-embedded", 50)
    assert result.total == 50 and result.chance == pytest.approx(0.1)
    assert result.correct <= 13  # Binomial(50, 0.1): P(X >= 14) = 0.0003
    assert not result.present() and result.p_value > 1e-3


def test_trace_names_a_client_only_below_the_corrected_threshold() -> None:
    shared = Verification(SHARED, 9, 10, 0.1, binomial_tail(9, 10, Fraction(1, 10)))
    strong = Verification("client/a", 6, 6, 0.1, 1e-6)
    weak = Verification("client/b", 3, 6, 0.1, 6e-4)  # below alpha, not below alpha / 2
    assert Trace(shared, {"a": strong, "b": weak}, 1e-3).leaked == "a"
    assert Trace(shared, {"b": weak, "c": weak}, 1e-3).leaked is None
    assert Trace(shared, {"b": weak}, 1e-3).leaked == "b"


def test_prune_zeroes_the_smallest_entries_of_each_tensor() -> None:
    state = {"a": torch.tensor([[3.0, -1.0, 0.5], [2.0, -4.0, 0.1]]), "b": torch.tensor([1.0, 1.0, 2.0])}
    pruned = prune_state(state, 0.5)
    torch.testing.assert_close(pruned["a"], torch.tensor([[3.0, 0.0, 0.0], [2.0, -4.0, 0.0]]))
    torch.testing.assert_close(pruned["b"], torch.tensor([0.0, 1.0, 2.0]))  # floor(1.5) = 1; ties by position
    torch.testing.assert_close(state["a"][0, 1], torch.tensor(-1.0))  # the input is left alone
    assert prune_state(state, 0.0)["a"].equal(state["a"])


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"watermark": {"size": 8}}, r"`watermark.secret` is required when `watermark.size` is set"),
        (
            {"watermark": {"secret": "k", "per_client": True}, "compression": {"downlink": {"method": "quantize", "bits": 8}}},
            r"`compression.downlink`",
        ),
        ({"watermark": {"secret": "k"}, "federation": {"runtime": "flower"}}, r"`watermark` is built for the in-process simulation only"),
        ({"watermark": {"secret": "k"}, "federation": {"algorithm": "fedkseed"}}, r"`federation.algorithm: fedkseed`"),
        ({"watermark": {"secret": "k"}, "personalization": {"method": "finetune"}}, r"`personalization.method: finetune`"),
    ],
)
def test_watermark_config_refusals(sections: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(FedlmError, match=message):
        validate_config(tiny_config(tmp_path, **sections))


def test_watermark_config_accepts_a_plain_section(tmp_path: Path) -> None:
    config = validate_config(tiny_config(tmp_path, watermark={"secret": "k", "per_client": True}))
    assert config.watermark.enabled and config.watermark.size == 64 and config.watermark.per_client
    assert not validate_config(tiny_config(tmp_path)).watermark.enabled
