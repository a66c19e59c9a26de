"""Closed-form checks of the lr schedule, client sampling, batch streams, seeds and dtype choice."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedlm.config.io import validate_config
from fedlm.core.sampling import batch_indices, sample_clients
from fedlm.core.seeding import derive_seed
from fedlm.federation.schedule import lr_at
from fedlm.federation.tasks import round_lrs
from fedlm.models.dtype import cpu_has_fast_bf16, resolve_dtype


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


def test_dtype_auto_follows_cpu_flags(tmp_path: Path) -> None:
    with_amx = tmp_path / "amx"
    with_amx.write_text("flags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    without = tmp_path / "plain"
    without.write_text("flags\t\t: fpu avx2\n")
    assert cpu_has_fast_bf16(with_amx) and not cpu_has_fast_bf16(without)
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
