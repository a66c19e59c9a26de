"""Split a dataset among K simulated clients (organisations).

Four schemes, all seeded explicitly through ``numpy.random.default_rng`` (the global
RNG state is never touched):

* ``iid``: uniform random split into near-equal shares (McMahan et al. 2017).
* ``dirichlet``: label / field skew (Hsu, Qi & Brown 2019; Yurochkin et al. 2019).
* ``by_field``: natural partition, one client per value of a column (Caldas et al. 2018).
* ``quantity``: quantity skew, client sizes drawn from a Dirichlet (Li et al. 2022).

Train and test sets are partitioned by separate calls with the same ``seed``. Everything
that defines *what a client looks like* (Dirichlet proportions) depends only on ``seed``
(and, for ``dirichlet``, on the field value itself), never on the data or on ``role``, so
each client's test share follows its training distribution. Only the choice of which
concrete examples land where uses an rng that also depends on ``role``.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlm.core.errors import FedlmError

METHODS: tuple[str, ...] = ("iid", "dirichlet", "by_field", "quantity")


@dataclass(frozen=True)
class Partition:
    """Indices of the examples of each client: client_indices[k] is a sorted list of example indices."""

    client_indices: list[list[int]]
    client_names: list[str]

    def __post_init__(self) -> None:
        if len(self.client_indices) != len(self.client_names):
            raise ValueError(f"Partition has {len(self.client_indices)} index lists but {len(self.client_names)} names")

    def sizes(self) -> list[int]:
        """Return the number of examples of each client, in client order."""
        return [len(indices) for indices in self.client_indices]


def partition_examples(
    examples: Sequence[Mapping[str, Any]],
    *,
    method: str,
    num_clients: int | None,
    seed: int,
    alpha: float = 0.5,
    field: str | None = None,
    min_examples: int = 1,
    role: str = "train",
) -> Partition:
    """Split ``examples`` among clients; every example goes to exactly one client.

    Args:
        examples: The dataset, one mapping (column -> value) per example.
        method: One of ``iid``, ``dirichlet``, ``by_field``, ``quantity``.
        num_clients: Number of clients K; for ``by_field`` None or the number of distinct values.
        seed: Non-negative seed; the same seed on train and test gives matching client distributions.
        alpha: Dirichlet concentration for ``dirichlet`` and ``quantity`` (small = more skewed).
        field: Column whose values drive ``dirichlet`` and ``by_field``.
        min_examples: For ``role == "train"``, the fewest examples any client may get.
        role: ``"train"`` enforces ``min_examples``; any other role (e.g. ``"test"``) allows empty clients.

    Returns:
        The partition, with sorted per-client index lists.

    Raises:
        FedlmError: On invalid settings or when a training client ends up too small.
    """
    _check_settings(method, num_clients, seed, alpha, min_examples)
    if role == "train" and len(examples) == 0:
        raise FedlmError("the training data has no examples, so there is nothing to split among clients; check the training data path and filters")
    if method == "iid":
        partition = _partition_iid(len(examples), _count(num_clients), seed, role)
    elif method == "quantity":
        partition = _partition_quantity(len(examples), _count(num_clients), seed, alpha, role)
    else:
        values = _field_values(examples, field, method)
        if method == "dirichlet":
            partition = _partition_dirichlet(values, _count(num_clients), seed, alpha, role)
        else:
            partition = _partition_by_field(values, num_clients, field)
    if role == "train":
        _check_min_examples(partition, method=method, alpha=alpha, min_examples=min_examples, n=len(examples))
    return partition


def describe_partition(partition: Partition, examples: Sequence[Mapping[str, Any]], field: str | None) -> list[dict[str, Any]]:
    """Summarise a partition, one row per client, for ``fedlm data partition``.

    Args:
        partition: The partition to describe.
        examples: The dataset that was partitioned.
        field: Column to count per client, or None for sizes only.

    Returns:
        ``[{"client": name, "size": n, "mix": {value: count, ...}}, ...]``; ``mix`` is
        ordered by field value and empty when ``field`` is None.
    """
    values = _field_values(examples, field, "describe") if field is not None else None
    rows: list[dict[str, Any]] = []
    for name, indices in zip(partition.client_names, partition.client_indices):
        mix: dict[Any, int] = {}
        if values is not None:
            counts = Counter(values[i] for i in indices)
            mix = {value: counts[value] for value in _sorted_values(counts)}
        rows.append({"client": name, "size": len(indices), "mix": mix})
    return rows


# --------------------------------------------------------------------------- schemes


def _partition_iid(n: int, num_clients: int, seed: int, role: str) -> Partition:
    """IID split (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
    from Decentralized Data"): seeded shuffle, then near-equal shares (sizes differ by <= 1)."""
    order = _derived_rng(seed, "assign", role).permutation(n)
    shares = np.array_split(order, num_clients)
    return _make_partition(shares)


def _partition_quantity(n: int, num_clients: int, seed: int, alpha: float, role: str) -> Partition:
    """Quantity skew (Li, Diao, Chen & He 2022, "Federated Learning on Non-IID Data Silos:
    An Experimental Study"): client proportions q ~ Dir(alpha * 1_K), examples shuffled iid
    and cut at those proportions.

    q comes from an rng seeded with ``seed`` only, so train and test get the same proportions.
    """
    proportions = np.random.default_rng(seed).dirichlet(np.full(num_clients, alpha))
    order = _derived_rng(seed, "assign", role).permutation(n)
    return _make_partition(_split_by_proportions(order, proportions))


def _partition_dirichlet(values: list[Hashable], num_clients: int, seed: int, alpha: float, role: str) -> Partition:
    """Label / field skew (Hsu, Qi & Brown 2019, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification"; Yurochkin et al. 2019): for each value c,
    p_c ~ Dir(alpha * 1_K) and the examples with value c are split among clients in proportions p_c.

    p_c is drawn from an rng derived from ``seed`` and the value c itself (not from the data,
    the order of values, or ``role``), so the same seed gives each client the same mix on the
    training and the test set, even when a value is missing from one of them.
    """
    by_value: dict[Hashable, list[int]] = {}
    for index, value in enumerate(values):
        by_value.setdefault(value, []).append(index)
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for value in _sorted_values(by_value):
        key = _value_key(value)
        proportions = _derived_rng(seed, "dirichlet", key).dirichlet(np.full(num_clients, alpha))
        order = _derived_rng(seed, "assign", role, key).permutation(np.asarray(by_value[value]))
        for client, part in enumerate(_split_by_proportions(order, proportions)):
            shares[client].append(part)
    return _make_partition([np.concatenate(parts) if parts else np.empty(0, int) for parts in shares])


def _partition_by_field(values: list[Hashable], num_clients: int | None, field: str | None) -> Partition:
    """Natural partition (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings"):
    one client per distinct value of ``field`` (e.g. domain, language, organisation)."""
    distinct = _sorted_values(set(values))
    if num_clients is not None and num_clients != len(distinct):
        raise FedlmError(
            f"`partition.num_clients` is {num_clients} but `partition.field` '{field}' has "
            f"{len(distinct)} distinct values under `partition.method: by_field`; "
            f"set `partition.num_clients` to {len(distinct)} or leave it out"
        )
    position = {value: k for k, value in enumerate(distinct)}
    indices: list[list[int]] = [[] for _ in distinct]
    for index, value in enumerate(values):
        indices[position[value]].append(index)
    return Partition(client_indices=indices, client_names=[str(value) for value in distinct])


# --------------------------------------------------------------------------- helpers


def _split_by_proportions(order: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    """Cut ``order`` into len(proportions) consecutive pieces of sizes ~ proportions * len(order).

    Cut points are rounded cumulative proportions, so no client systematically gets the remainder.
    """
    bounds = np.rint(np.cumsum(proportions)[:-1] * len(order)).astype(int)
    return np.split(order, np.clip(bounds, 0, len(order)))


def _make_partition(shares: Sequence[np.ndarray]) -> Partition:
    """Build a Partition with sorted python-int index lists and names "0", "1", ..."""
    indices = [sorted(int(i) for i in share) for share in shares]
    return Partition(client_indices=indices, client_names=[str(k) for k in range(len(indices))])


def _derived_rng(seed: int, *parts: str) -> np.random.Generator:
    """An rng determined by ``seed`` and the given labels (stable across runs and platforms)."""
    words: list[int] = [seed]
    for part in parts:
        digest = hashlib.sha256(part.encode("utf-8")).digest()
        words.extend(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))
    return np.random.default_rng(words)


def _value_key(value: Hashable) -> str:
    """A stable text key for a field value (numpy scalars are treated as python scalars)."""
    if isinstance(value, np.generic):
        value = value.item()
    return f"{type(value).__name__}:{value!r}"


def _sorted_values(values: Any) -> list[Hashable]:
    """Sort distinct values naturally, falling back to (type, repr) order for mixed types."""
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=_value_key)


def _field_values(examples: Sequence[Mapping[str, Any]], field: str | None, method: str) -> list[Hashable]:
    """Return ``example[field]`` for every example, validating the field first."""
    if not field:
        raise FedlmError(
            f"`partition.method: {method}` needs `partition.field`; set it to the column to split on (e.g. a label, domain or language column)"
        )
    if len(examples) > 0 and field not in examples[0]:
        columns = ", ".join(str(column) for column in examples[0].keys())
        raise FedlmError(f"`partition.field` '{field}' is not a column of the data; columns are: {columns}")
    values: list[Hashable] = []
    for index, example in enumerate(examples):
        if field not in example:
            raise FedlmError(
                f"example {index} has no column '{field}' named by `partition.field`; "
                "give every example that column or choose another `partition.field`"
            )
        value = example[field]
        if not isinstance(value, Hashable):
            raise FedlmError(
                f"`partition.field` '{field}' has a {type(value).__name__} value at example {index}; "
                "choose a column with scalar values such as a label, domain or language"
            )
        values.append(value.item() if isinstance(value, np.generic) else value)
    return values


def _is_int(value: Any) -> bool:
    """True for python / numpy integers, False for bools and everything else."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _count(num_clients: int | None) -> int:
    """``num_clients`` as an int, already validated by _check_settings."""
    return int(num_clients)  # type: ignore[arg-type]


def _check_settings(method: str, num_clients: int | None, seed: int, alpha: float, min_examples: int) -> None:
    """Validate the scalar settings, naming the config field and the fix."""
    if method not in METHODS:
        raise FedlmError(f"`partition.method` '{method}' is unknown; valid methods are: {', '.join(METHODS)}")
    if num_clients is None and method != "by_field":
        raise FedlmError(f"`partition.method: {method}` needs `partition.num_clients`; set it to 1 or more")
    if num_clients is not None and (not _is_int(num_clients) or num_clients < 1):
        raise FedlmError(f"`partition.num_clients` is {num_clients!r}; set it to a whole number of 1 or more")
    if not _is_int(seed) or seed < 0:
        raise FedlmError(f"`seed` is {seed!r}; set it to a whole number of 0 or more")
    if method in ("dirichlet", "quantity"):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise FedlmError(
                f"`partition.alpha` is {alpha!r}; set it to a positive number (small, e.g. 0.1, for strong skew; large, e.g. 100, for near-iid)"
            )
    if not _is_int(min_examples) or min_examples < 0:
        raise FedlmError(f"`partition.min_examples` is {min_examples!r}; set it to a whole number of 0 or more")


def _check_min_examples(partition: Partition, *, method: str, alpha: float, min_examples: int, n: int) -> None:
    """Raise if a training client got fewer than ``min_examples`` examples (no silent resampling)."""
    for name, size in zip(partition.client_names, partition.sizes()):
        if size >= min_examples:
            continue
        got = "no training examples" if size == 0 else f"only {size} training examples"
        if min_examples > 1:
            got += f" (`partition.min_examples` is {min_examples})"
        if method in ("dirichlet", "quantity"):
            detail, fix = f"(alpha={alpha})", "raise `partition.alpha` or lower `partition.num_clients`"
        elif method == "iid":
            detail, fix = f"({n} examples over {len(partition.sizes())} clients)", "lower `partition.num_clients`"
        else:
            detail, fix = "", "merge rare values of `partition.field` or choose another field"
        if min_examples > 1:
            fix += " or lower `partition.min_examples`"
        where = f"under `partition.method: {method}` {detail}".rstrip()
        raise FedlmError(f"client {name} got {got} {where}; {fix}")
