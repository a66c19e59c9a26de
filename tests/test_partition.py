"""Tests for fedlm.data.partition: sizes, coverage, seeding, skew, train/test consistency, errors."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest

from fedlm.core.errors import FedlmError
from fedlm.data.partition import Partition, describe_partition, partition_examples

LABELS = ["l0", "l1", "l2", "l3"]


def make_examples(per_label: int, labels: list[str] = LABELS) -> list[dict[str, Any]]:
    """Synthetic dataset: ``per_label`` examples for each label, interleaved."""
    return [{"instruction": f"q{i}", "output": f"a{i}", "label": label} for i in range(per_label) for label in labels]


def domain_examples() -> list[dict[str, Any]]:
    domains = ["medical"] * 7 + ["legal"] * 5 + ["finance"] * 3
    return [{"instruction": f"q{i}", "output": "a", "domain": d} for i, d in enumerate(domains)]


def run(examples: list[dict[str, Any]], method: str, **kwargs: Any) -> Partition:
    settings: dict[str, Any] = {"num_clients": 4, "seed": 0}
    if method in ("dirichlet", "by_field"):
        settings["field"] = "label"
    if method == "by_field":
        settings["num_clients"] = None
    settings.update(kwargs)
    return partition_examples(examples, method=method, **settings)


def label_mixes(partition: Partition, examples: list[dict[str, Any]]) -> list[Counter[str]]:
    return [Counter(examples[i]["label"] for i in indices) for indices in partition.client_indices]


def majority_share(partition: Partition, examples: list[dict[str, Any]]) -> float:
    """Mean over non-empty clients of the share of the client's most common label."""
    shares = [max(mix.values()) / sum(mix.values()) for mix in label_mixes(partition, examples) if mix]
    return float(np.mean(shares))


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("method", ["iid", "dirichlet", "by_field", "quantity"])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_disjoint_covering_and_sorted(method: str, seed: int) -> None:
    examples = make_examples(50)
    partition = run(examples, method, seed=seed, alpha=1.0, role="test")
    flat = [i for indices in partition.client_indices for i in indices]
    assert sorted(flat) == list(range(len(examples)))  # covering and disjoint
    assert len(flat) == len(set(flat))
    assert sum(partition.sizes()) == len(examples)
    assert partition.sizes() == [len(indices) for indices in partition.client_indices]
    for indices in partition.client_indices:
        assert indices == sorted(indices)
        assert all(type(i) is int for i in indices)
    assert len(partition.client_names) == len(partition.client_indices)


@pytest.mark.parametrize(("n", "k"), [(100, 4), (101, 4), (103, 7), (5, 5), (10, 3)])
def test_iid_sizes_near_equal(n: int, k: int) -> None:
    examples = [{"text": str(i)} for i in range(n)]
    partition = partition_examples(examples, method="iid", num_clients=k, seed=3)
    sizes = partition.sizes()
    assert len(sizes) == k
    assert sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1
    assert partition.client_names == [str(i) for i in range(k)]


def test_iid_is_shuffled() -> None:
    partition = partition_examples([{"t": i} for i in range(100)], method="iid", num_clients=2, seed=0)
    assert partition.client_indices[0] != list(range(50))


# --------------------------------------------------------------------------- seeding


@pytest.mark.parametrize("method", ["iid", "dirichlet", "by_field", "quantity"])
def test_same_seed_identical(method: str) -> None:
    examples = make_examples(100)
    first = run(examples, method, seed=42, role="test")
    second = run(examples, method, seed=42, role="test")
    assert first == second


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_different_seed_differs(method: str) -> None:
    examples = make_examples(100)
    first = run(examples, method, seed=1, role="test")
    second = run(examples, method, seed=2, role="test")
    assert first.client_indices != second.client_indices


def test_global_rng_untouched() -> None:
    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state(), random.getstate()
    for method in ["iid", "dirichlet", "by_field", "quantity"]:
        run(make_examples(20), method, role="test")
    after = np.random.get_state()
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(np_state, after))
    assert random.getstate() == py_state


# --------------------------------------------------------------------------- by_field


def test_by_field_one_pure_client_per_value() -> None:
    examples = domain_examples()
    partition = partition_examples(examples, method="by_field", num_clients=None, seed=0, field="domain")
    assert partition.client_names == ["finance", "legal", "medical"]
    assert partition.sizes() == [3, 5, 7]
    rows = describe_partition(partition, examples, "domain")
    assert [row["mix"] for row in rows] == [{"finance": 3}, {"legal": 5}, {"medical": 7}]
    same = partition_examples(examples, method="by_field", num_clients=3, seed=9, field="domain")
    assert same == partition


def test_by_field_num_clients_mismatch() -> None:
    with pytest.raises(FedlmError, match="partition.num_clients") as info:
        partition_examples(domain_examples(), method="by_field", num_clients=5, seed=0, field="domain")
    assert "5" in str(info.value) and "3" in str(info.value)


def test_by_field_min_examples() -> None:
    with pytest.raises(FedlmError, match="partition.min_examples"):
        partition_examples(domain_examples(), method="by_field", num_clients=None, seed=0, field="domain", min_examples=4)


# --------------------------------------------------------------------------- dirichlet


def test_dirichlet_small_alpha_is_skewed() -> None:
    examples = make_examples(500)
    shares = [majority_share(run(examples, "dirichlet", seed=s, alpha=0.05, role="test"), examples) for s in range(10)]
    iid_shares = [majority_share(run(examples, "iid", seed=s), examples) for s in range(10)]
    assert np.mean(shares) > 0.6
    assert max(iid_shares) < 0.3


def test_dirichlet_huge_alpha_is_near_uniform() -> None:
    examples = make_examples(500)
    for seed in range(3):
        partition = run(examples, "dirichlet", seed=seed, alpha=1000.0)
        for mix in label_mixes(partition, examples):
            total = sum(mix.values())
            assert set(mix) == set(LABELS)
            assert all(abs(mix[label] / total - 0.25) < 0.06 for label in LABELS)


def test_dirichlet_train_and_test_mixes_match() -> None:
    train, test = make_examples(500), make_examples(100)
    agree = total = 0
    for seed in range(5):
        train_part = run(train, "dirichlet", seed=seed, alpha=0.1, min_examples=0)
        test_part = run(test, "dirichlet", seed=seed, alpha=0.1, role="test")
        for train_mix, test_mix in zip(label_mixes(train_part, train), label_mixes(test_part, test)):
            for label in LABELS:  # test counts follow train counts scaled by 100/500
                assert abs(train_mix[label] / 5 - test_mix[label]) < 2
            if train_mix and test_mix:
                total += 1
                agree += train_mix.most_common(1)[0][0] == test_mix.most_common(1)[0][0]
    assert agree >= 0.75 * total


def test_dirichlet_test_mix_stable_when_a_label_is_missing() -> None:
    train = make_examples(500)
    test = make_examples(100, labels=["l0", "l1", "l3"])
    train_part = run(train, "dirichlet", seed=4, alpha=0.3, min_examples=0)
    test_part = run(test, "dirichlet", seed=4, alpha=0.3, role="test")
    for train_mix, test_mix in zip(label_mixes(train_part, train), label_mixes(test_part, test)):
        assert test_mix["l2"] == 0
        for label in ["l0", "l1", "l3"]:
            assert abs(train_mix[label] / 5 - test_mix[label]) < 2


def test_dirichlet_roles_choose_different_examples() -> None:
    examples = make_examples(100)
    train_part = run(examples, "dirichlet", seed=0, alpha=1.0)
    test_part = run(examples, "dirichlet", seed=0, alpha=1.0, role="test")
    assert [len(x) for x in train_part.client_indices] == [len(x) for x in test_part.client_indices]
    assert train_part.client_indices != test_part.client_indices


# --------------------------------------------------------------------------- quantity


def test_quantity_small_alpha_is_skewed_and_large_alpha_is_even() -> None:
    examples = make_examples(500)
    skewed = [max(run(examples, "quantity", seed=s, alpha=0.1, num_clients=5, role="test").sizes()) for s in range(10)]
    assert np.mean(skewed) / len(examples) > 0.5
    for seed in range(3):
        sizes = run(examples, "quantity", seed=seed, alpha=1000.0, num_clients=5).sizes()
        assert max(sizes) - min(sizes) < 0.1 * len(examples) / 5


def test_quantity_train_and_test_share_proportions() -> None:
    train, test = make_examples(500), make_examples(100)
    train_sizes = run(train, "quantity", seed=5, alpha=0.5, min_examples=0).sizes()
    test_sizes = run(test, "quantity", seed=5, alpha=0.5, role="test").sizes()
    assert all(abs(a / 5 - b) < 2 for a, b in zip(train_sizes, test_sizes))
    assert len(set(train_sizes)) > 1


# --------------------------------------------------------------------------- describe


def test_describe_partition() -> None:
    examples = make_examples(30)
    partition = run(examples, "dirichlet", alpha=0.5, role="test")
    rows = describe_partition(partition, examples, "label")
    assert [row["client"] for row in rows] == partition.client_names
    assert [row["size"] for row in rows] == partition.sizes()
    for row, indices in zip(rows, partition.client_indices):
        assert sum(row["mix"].values()) == row["size"]
        assert row["mix"] == dict(Counter(examples[i]["label"] for i in indices))
        assert list(row["mix"]) == sorted(row["mix"])
    assert all(row["mix"] == {} for row in describe_partition(partition, examples, None))


# --------------------------------------------------------------------------- errors


def test_unknown_method_lists_valid_ones() -> None:
    with pytest.raises(FedlmError, match="partition.method") as info:
        partition_examples(make_examples(5), method="random", num_clients=2, seed=0)
    assert "iid, dirichlet, by_field, quantity" in str(info.value)


@pytest.mark.parametrize("method", ["dirichlet", "by_field"])
def test_missing_field(method: str) -> None:
    with pytest.raises(FedlmError, match="partition.field"):
        partition_examples(make_examples(5), method=method, num_clients=2, seed=0)


@pytest.mark.parametrize("method", ["dirichlet", "by_field"])
def test_field_not_a_column(method: str) -> None:
    with pytest.raises(FedlmError, match="partition.field") as info:
        partition_examples(make_examples(5), method=method, num_clients=None if method == "by_field" else 2, seed=0, field="domain")
    assert "'domain'" in str(info.value)
    assert "instruction, output, label" in str(info.value)


def test_field_missing_in_later_example() -> None:
    examples = make_examples(5) + [{"instruction": "x", "output": "y"}]
    with pytest.raises(FedlmError, match="partition.field") as info:
        run(examples, "dirichlet")
    assert "example 20" in str(info.value)


@pytest.mark.parametrize("num_clients", [0, -1, 2.5, True])
def test_bad_num_clients(num_clients: Any) -> None:
    with pytest.raises(FedlmError, match="partition.num_clients"):
        partition_examples(make_examples(5), method="iid", num_clients=num_clients, seed=0)


def test_num_clients_required() -> None:
    with pytest.raises(FedlmError, match="partition.num_clients"):
        partition_examples(make_examples(5), method="quantity", num_clients=None, seed=0)


@pytest.mark.parametrize("method", ["dirichlet", "quantity"])
@pytest.mark.parametrize("alpha", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_alpha(method: str, alpha: float) -> None:
    with pytest.raises(FedlmError, match="partition.alpha"):
        run(make_examples(5), method, alpha=alpha)


@pytest.mark.parametrize("seed", [-1, 1.5])
def test_bad_seed(seed: Any) -> None:
    with pytest.raises(FedlmError, match="seed"):
        partition_examples(make_examples(5), method="iid", num_clients=2, seed=seed)


def test_bad_min_examples() -> None:
    with pytest.raises(FedlmError, match="partition.min_examples"):
        partition_examples(make_examples(5), method="iid", num_clients=2, seed=0, min_examples=-1)


def test_empty_train_client_iid() -> None:
    with pytest.raises(FedlmError, match="partition.num_clients"):
        partition_examples([{"t": i} for i in range(3)], method="iid", num_clients=5, seed=0)
    test_part = partition_examples([{"t": i} for i in range(3)], method="iid", num_clients=5, seed=0, role="test")
    assert sorted(test_part.sizes()) == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("method", ["dirichlet", "quantity"])
def test_empty_train_client_skewed_names_fix(method: str) -> None:
    examples = make_examples(10)
    with pytest.raises(FedlmError) as info:
        run(examples, method, alpha=0.01, num_clients=20)
    message = str(info.value)
    assert "partition.alpha" in message and "partition.num_clients" in message
    assert f"partition.method: {method}" in message
    test_part = run(examples, method, alpha=0.01, num_clients=20, role="test")
    assert 0 in test_part.sizes() and sum(test_part.sizes()) == len(examples)


def test_min_examples_enforced_for_train() -> None:
    examples = [{"t": i} for i in range(40)]
    with pytest.raises(FedlmError, match="partition.min_examples"):
        partition_examples(examples, method="iid", num_clients=4, seed=0, min_examples=11)
    partition = partition_examples(examples, method="iid", num_clients=4, seed=0, min_examples=10)
    assert partition.sizes() == [10, 10, 10, 10]


def test_empty_training_data() -> None:
    with pytest.raises(FedlmError, match="training data"):
        partition_examples([], method="iid", num_clients=2, seed=0)
    assert partition_examples([], method="iid", num_clients=2, seed=0, role="test").sizes() == [0, 0]
