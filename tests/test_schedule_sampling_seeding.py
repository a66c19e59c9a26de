"""Closed-form checks of the lr schedule, client sampling, batch streams, seeds and dtype choice."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from fedlm.config import ModelConfig
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.core.sampling import batch_indices, sample_clients
from fedlm.core.seeding import derive_seed
from fedlm.federation.schedule import lr_at
from fedlm.federation.tasks import round_lrs
from fedlm.models.dtype import AUTO_DTYPE_ENV, cpu_has_fast_bf16, resolve_dtype
from fedlm.models.loading import load_base_model


def test_lr_schedules_hand_computed() -> None:
    assert lr_at(0.7, base_lr=1.0, schedule="constant", min_lr_ratio=0.1) == 1.0
    assert lr_at(0.5, base_lr=1.0, schedule="linear", min_lr_ratio=0.1) == pytest.approx(0.55)
    assert lr_at(0.5, base_lr=1.0, schedule="cosine", min_lr_ratio=0.0) == pytest.approx(0.5)
    assert lr_at(0.25, base_lr=2.0, schedule="cosine", min_lr_ratio=0.5) == pytest.approx(1.0 + 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(1.0, base_lr=1.0, schedule="cosine", min_lr_ratio=0.1) == pytest.approx(0.1)


def test_round_lrs_continue_across_rounds() -> None:
    config = validate_config({"federation": {"rounds": 2, "local_steps": 2, "lr": 1.0, "lr_schedule": "linear", "min_lr_ratio": 0.0}})
    assert round_lrs(config, 1) == pytest.approx([1.0, 0.75])
    assert round_lrs(config, 2) == pytest.approx([0.5, 0.25])


def test_client_sampling_is_seeded_per_round_and_without_replacement() -> None:
    names = [f"c{i}" for i in range(10)]
    a = sample_clients(names, 4, seed=3, round_num=1)
    assert a == sample_clients(names, 4, seed=3, round_num=1)
    assert len(set(a)) == 4 and set(a) <= set(names)
    rounds = {tuple(sample_clients(names, 4, seed=3, round_num=r)) for r in range(1, 8)}
    assert len(rounds) > 1
    assert sample_clients(names, None, 0, 1) == names


def test_batch_stream_covers_each_epoch_once() -> None:
    batches = batch_indices(num_examples=6, num_steps=3, batch_size=4, seed=1)
    flat = [i for b in batches for i in b]
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)
    assert sorted(flat[:6]) == list(range(6))  # first epoch is a permutation
    assert batches == batch_indices(6, 3, 4, seed=1)
    assert batches != batch_indices(6, 3, 4, seed=2)


def test_derived_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(0, "local", 1, "a") == derive_seed(0, "local", 1, "a")
    assert len({derive_seed(0, "local", r, c) for r in range(3) for c in "abc"}) == 9
    assert 0 <= derive_seed(5, "x") < 2**63


def test_global_rng_is_not_touched_by_training_seeds() -> None:
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    sample_clients([str(i) for i in range(5)], 2, 0, 1)
    batch_indices(10, 2, 3, 0)
    assert torch.equal(torch.rand(3), expected)


def test_dtype_auto_follows_cpu_flags_unless_overridden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` is bfloat16 exactly when the cpuinfo has AMX or AVX512-BF16 flags; FEDLM_AUTO_DTYPE wins over the
    probe, never over an explicit `model.dtype`, and any other value of it is refused naming the variable."""
    cpu = torch.device("cpu")
    with_amx, with_avx512, without = tmp_path / "amx", tmp_path / "avx512", tmp_path / "plain"
    with_amx.write_text("flags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    with_avx512.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    without.write_text("flags\t\t: fpu avx2 avx512f\n")
    assert cpu_has_fast_bf16(with_amx) and cpu_has_fast_bf16(with_avx512) and not cpu_has_fast_bf16(without)
    assert not cpu_has_fast_bf16(tmp_path / "missing")

    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)  # the suite pins it (conftest); here the probe decides
    assert resolve_dtype("auto", cpu, cpuinfo=with_amx) == torch.bfloat16
    assert resolve_dtype("auto", cpu, cpuinfo=with_avx512) == torch.bfloat16
    assert resolve_dtype("auto", cpu, cpuinfo=without) == torch.float32
    monkeypatch.setenv(AUTO_DTYPE_ENV, "")
    assert resolve_dtype("auto", cpu, cpuinfo=with_amx) == torch.bfloat16  # empty means unset
    for explicit in ("float32", "bfloat16"):
        assert resolve_dtype(explicit, cpu, cpuinfo=with_amx) == resolve_dtype(explicit, cpu, cpuinfo=without) == getattr(torch, explicit)

    monkeypatch.setenv(AUTO_DTYPE_ENV, "float32")
    assert resolve_dtype("auto", cpu, cpuinfo=with_avx512) == torch.float32
    assert resolve_dtype("bfloat16", cpu, cpuinfo=without) == torch.bfloat16
    monkeypatch.setenv(AUTO_DTYPE_ENV, "bfloat16")
    assert resolve_dtype("auto", cpu, cpuinfo=without) == torch.bfloat16
    assert resolve_dtype("float32", cpu, cpuinfo=with_amx) == torch.float32
    for bad in ("fp16", "float16", "bf16", "auto"):
        monkeypatch.setenv(AUTO_DTYPE_ENV, bad)
        with pytest.raises(FedlmError, match=rf"{AUTO_DTYPE_ENV} must be float32 or bfloat16 .*got '{bad}'"):
            resolve_dtype("auto", cpu, cpuinfo=without)
        assert resolve_dtype("float32", cpu) == torch.float32  # only `auto` reads it


def test_suite_pins_auto_to_float32() -> None:
    """conftest pins `auto` so that no test depends on the CPU it meets (dtype-sensitive tests set `model.dtype`)."""
    assert os.environ[AUTO_DTYPE_ENV] == "float32"
    assert load_base_model(ModelConfig(name="tiny-random-llama"), device=torch.device("cpu")).model.dtype == torch.float32
