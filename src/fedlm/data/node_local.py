"""``partition.method: node_local``: no split of one dataset; every client's data is on its own SuperNode.

The server holds only the held-out ``data.test`` (it evaluates the global model and never reads a client's data);
a node reads its own ``data.train`` (its local file, folder or embedded name) as the examples of the one client it
serves. Tokenization is the run's (format, chat template, ``data.max_length``, objective), so a client trains on the
same examples as in a simulation whose ``by_field`` partition gives it the same records in the same order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

from fedlm.config.schema import DataConfig, EvalConfig, PartitionConfig
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.data.prepare import FederatedData, subsample
from fedlm.data.readers import read_records

if TYPE_CHECKING:
    from fedlm.objectives.base import Objective


def server_data(
    data: DataConfig,
    partition: PartitionConfig,
    evaluation: EvalConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    objective: Objective,
) -> FederatedData:
    """The server's view: the client names and the held-out test set, no training example of any client."""
    if data.test is None:
        raise FedlmError("`data.test` is required with `partition.method: node_local` (the server's held-out set)")
    records = read_records(data.test, "data.test")
    if evaluation.max_examples is not None and len(records) > evaluation.max_examples:
        records = subsample(records, evaluation.max_examples, derive_seed(seed, "eval-subsample"))
    objective.check_records(records, "data.test", data)
    names = list(partition.clients or [])
    test = objective.test_examples(records, tokenizer, data, [None] * len(records), "data.test")
    return FederatedData(client_names=names, client_train={name: [] for name in names}, test=test)


def node_data(
    data: DataConfig, partition: PartitionConfig, tokenizer: PreTrainedTokenizerBase, seed: int, objective: Objective, client: str
) -> FederatedData:
    """A node's view: the examples of ``client`` from the node's own ``data.train``; no test set (the server evaluates)."""
    names = list(partition.clients or [])
    if client not in names:
        raise FedlmError(f"client {client!r} is not in `partition.clients` ({', '.join(names)})")
    records = read_records(data.train, "data.train")
    if data.max_train_examples is not None and len(records) > data.max_train_examples:
        records = subsample(records, data.max_train_examples, derive_seed(seed, "train-subsample", client))
    objective.check_records(records, "data.train", data)
    examples = objective.train_examples(records, tokenizer, data, f"client {client!r}", [f"data.train example {i}" for i in range(len(records))])
    return FederatedData(client_names=names, client_train={client: examples}, test=[])
