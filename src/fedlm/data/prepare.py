"""From ``data`` and ``partition`` config to tokenized per-client training sets and a test set with client shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from fedlm.config.schema import DataConfig, EvalConfig, PartitionConfig
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.data.choices import check_choices
from fedlm.data.formats import Message, prompt_and_reference, to_messages
from fedlm.data.partition import Partition, partition_examples
from fedlm.data.readers import EMBEDDED_PREFIX, Record, read_records
from fedlm.data.tokenize import TokenizedExample, tokenize_conversation

if TYPE_CHECKING:
    from fedlm.objectives.base import Objective


@dataclass
class TestExample:
    """One held-out example: its record (all fields), prompt, reference answer and tokenized conversation
    (``objective: clm``: a packed block, no prompt; ``objective: dpo``: the chosen answer, and ``rejected``). It counts
    in the global test set when ``in_global``, and in the test share of ``client`` when that is set."""

    record: Record
    prompt: list[Message]
    reference: str
    tokens: TokenizedExample
    client: str | None
    rejected: TokenizedExample | None = None
    in_global: bool = True  # part of the global test set (clm: a client's own blocks are only in its share)


@dataclass
class FederatedData:
    """Each client's tokenized training examples, the shared test set whose examples carry a client share, and the
    server's clean root set (empty unless an aggregator needs one)."""

    client_names: list[str]
    client_train: dict[str, list[Any]]  # the objective's examples: TokenizedExample (sft, clm), PreferenceExample (dpo)
    test: list[TestExample]
    root: list[Any] = field(default_factory=list)

    def union_train(self) -> list[Any]:
        """All clients' training examples, in client order (for the centralized baseline)."""
        return [ex for name in self.client_names for ex in self.client_train[name]]


def load_split_records(data: DataConfig, seed: int) -> tuple[list[Record], list[Record]]:
    """Train and test records: ``data.test`` if given (or the embedded test split), else a seeded split."""
    train = read_records(data.train, "data.train")
    if data.test is not None:
        test = read_records(data.test, "data.test")
    elif data.train.startswith(EMBEDDED_PREFIX) and "/" not in data.train:
        test = read_records(f"{data.train}/test", "data.test")
    else:
        order = np.random.default_rng(derive_seed(seed, "test-split") % 2**32).permutation(len(train))
        cut = max(1, int(round(len(train) * data.test_fraction)))
        if cut >= len(train):
            raise FedlmError(f"`data.test_fraction` {data.test_fraction} leaves no training examples out of {len(train)}")
        test = [train[i] for i in sorted(order[:cut])]
        train = [train[i] for i in sorted(order[cut:])]
    if data.max_train_examples is not None and len(train) > data.max_train_examples:
        train = subsample(train, data.max_train_examples, derive_seed(seed, "train-subsample"))
    return train, test


RecordTransform = Callable[[list[str], str, list[Record]], list[Record]]


def prepare_federated_data(
    data: DataConfig,
    partition: PartitionConfig,
    evaluation: EvalConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    transform_records: RecordTransform | None = None,
    root_size: int = 0,
    *,
    objective: Objective,
) -> FederatedData:
    """Read, check, partition and tokenize; every client must end up with at least one usable example.

    The objective decides the columns the records need and how they become examples;
    partitioning is the same for every objective. ``transform_records(client_names, client, records)`` may rewrite
    a client's training records before they are tokenized (the attack harness's data poisoning); the test set is
    never transformed.
    """
    train_records, test_records = load_split_records(data, seed)
    if evaluation.max_examples is not None and len(test_records) > evaluation.max_examples:
        test_records = subsample(test_records, evaluation.max_examples, derive_seed(seed, "eval-subsample"))
    objective.check_records(train_records, "data.train", data)
    objective.check_records(test_records, "data.test", data)
    train_part = split_among_clients(train_records, partition, seed)
    test_owner = assign_test_shares(test_records, train_part, partition, seed)
    client_train: dict[str, list[Any]] = {}
    for name, indices in zip(train_part.client_names, train_part.client_indices):
        records = [train_records[i] for i in indices]
        if transform_records is not None:
            records = transform_records(list(train_part.client_names), name, records)
        where = [f"data.train example {i}" for i in indices]
        where += [f"client {name!r} added record {j}" for j in range(len(where), len(records))]  # a transform may add records
        client_train[name] = objective.train_examples(records, tokenizer, data, f"client {name!r}", where)
    test = objective.test_examples(test_records, tokenizer, data, test_owner, "data.test")
    root: list[Any] = []
    if root_size > 0:
        picked = subsample(train_records, min(root_size, len(train_records)), derive_seed(seed, "root-set"))
        root = objective.train_examples(picked, tokenizer, data, "the server's root set", ["root-set example"] * len(picked))
    return FederatedData(client_names=list(train_part.client_names), client_train=client_train, test=test, root=root)


def build_test_examples(
    records: list[Record],
    fmt: str,
    data: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    where: str,
    owners: list[str | None] | None = None,
) -> list[TestExample]:
    """Held-out examples from records: the run's system prompt, chat template and ``data.max_length``."""
    out = []
    for i, record in enumerate(records):
        messages = to_messages(record, fmt, data.system_prompt, f"{where} example {i}")
        check_choices(record, f"`{where}` example {i}")
        prompt, reference = prompt_and_reference(messages)
        tokens = tokenize_conversation(tokenizer, messages, data.max_length)
        out.append(TestExample(record=record, prompt=prompt, reference=reference, tokens=tokens, client=owners[i] if owners else None))
    return out


def split_among_clients(records: list[Record], partition: PartitionConfig, seed: int) -> Partition:
    """The training partition for ``partition`` (its seed derived from the experiment seed)."""
    return partition_examples(
        records,
        method=partition.method,
        num_clients=partition.num_clients,
        seed=derive_seed(seed, "partition") % 2**32,
        alpha=partition.alpha,
        field=partition.field,
        min_examples=partition.min_examples,
        role="train",
    )


def assign_test_shares(records: list[Record], train_part: Partition, partition: PartitionConfig, seed: int) -> list[str | None]:
    """The client whose test share each test example belongs to (None: only in the global test set).

    ``by_field`` matches the example's field value to the client's name; the other methods partition the test
    set with the same seed, so each client's test share follows its training distribution.
    """
    if partition.method == "by_field":
        names = set(train_part.client_names)
        by_value: list[str | None] = []
        for record in records:
            value = record.get(partition.field or "")
            by_value.append(str(value) if value is not None and str(value) in names else None)
        return by_value
    test_part = partition_examples(
        records,
        method=partition.method,
        num_clients=len(train_part.client_names),
        seed=derive_seed(seed, "partition") % 2**32,
        alpha=partition.alpha,
        field=partition.field,
        role="test",
    )
    owner: list[str | None] = [None] * len(records)
    for name, indices in zip(train_part.client_names, test_part.client_indices):
        for i in indices:
            owner[i] = name
    return owner


def subsample(records: list[Record], count: int, seed: int) -> list[Record]:
    """``count`` of ``records`` drawn without replacement with ``seed``, in their original order."""
    keep = np.random.default_rng(seed % 2**32).choice(len(records), size=count, replace=False)
    return [records[i] for i in sorted(keep)]
