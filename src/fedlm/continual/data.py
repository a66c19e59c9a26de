"""The data of a continual run: each client's training examples cut into slices by ``continual.field``, and the test
examples of every slice.

The records are read, partitioned and given test shares exactly as in :func:`fedlm.data.prepare.prepare_federated_data`
(same seeds), after keeping only the records of the stream's slices; then each client's records are tokenized slice
by slice, so that every example knows its slice whatever the objective drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from fedlm.config.schema import ExperimentConfig
from fedlm.continual.schedule import Stream, build_stream, wanted_slices
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.data.prepare import FederatedData, TestExample, assign_test_shares, load_split_records, split_among_clients, subsample
from fedlm.data.readers import Record
from fedlm.objectives import Objective


@dataclass
class ContinualData(FederatedData):
    """:class:`FederatedData` (``client_train``: every slice of a client, in time order) with the slices apart."""

    slice_names: list[str] = field(default_factory=list)
    slices: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # client -> slice -> examples
    stream: Stream | None = None  # when each client holds which slice (checked against the clients and slices)

    def sizes(self) -> dict[str, dict[str, int]]:
        """Per client: slice -> number of training examples."""
        return {c: {s: len(ex) for s, ex in by_slice.items()} for c, by_slice in self.slices.items()}

    def test_slice(self, example: TestExample, field_name: str) -> str | None:
        """The slice of a test example (None: not one of the stream's)."""
        value = example.record.get(field_name)
        return str(value) if value is not None and str(value) in self.slice_names else None


def slice_of(record: Record, field_name: str, where: str) -> str:
    """The slice value of ``record``; a record without the field is a FedlmError naming it."""
    value = record.get(field_name)
    if value is None:
        raise FedlmError(f"`continual.field` {field_name!r}: {where} has no such field; every record needs one (its time period or task)")
    return str(value)


def continual_federated_data(config: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, objective: Objective) -> ContinualData:
    """Read, keep the stream's slices, partition, and tokenize each client's records slice by slice."""
    cont = config.continual
    if cont is None:
        raise ValueError("continual_federated_data needs a `continual` section")
    train, test = load_split_records(config.data, config.seed)
    if config.eval.max_examples is not None and len(test) > config.eval.max_examples:
        test = subsample(test, config.eval.max_examples, derive_seed(config.seed, "eval-subsample"))
    objective.check_records(train, "data.train", config.data)
    objective.check_records(test, "data.test", config.data)
    names = wanted_slices(cont)
    values = [slice_of(r, cont.field, f"data.train example {i}") for i, r in enumerate(train)]
    found = sorted(set(values))
    missing = [s for s in names if s not in found]
    if missing:
        where = "continual.slices" if cont.slices is not None else "continual.schedule"
        shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "")
        raise FedlmError(f"`{where}` names slice {missing[0]!r}, which no training record's `{cont.field}` has; the data has: {shown}")
    keep = [i for i, v in enumerate(values) if v in names]
    train = [train[i] for i in keep]
    test = [r for r in test if r.get(cont.field) is not None and str(r[cont.field]) in names]
    if not test:
        raise FedlmError(f"`data.test` has no record of the stream's slices ({', '.join(names)}); forgetting cannot be measured without them")
    part = split_among_clients(train, config.partition, config.seed)
    owners = assign_test_shares(test, part, config.partition, config.seed)
    by_client: dict[str, dict[str, list[Any]]] = {}
    for client, indices in zip(part.client_names, part.client_indices):
        by_client[client] = _tokenized_slices(train, indices, keep, names, cont.field, client, objective, tokenizer, config)
    client_train = {c: [ex for s in names for ex in by_client[c].get(s, [])] for c in part.client_names}
    test_examples = objective.test_examples(test, tokenizer, config.data, owners, "data.test")
    data = ContinualData(list(part.client_names), client_train, test_examples, [], names, by_client)
    data.stream = build_stream(cont, data.client_names, data.sizes(), config.federation.rounds, config.federation.min_clients)
    return data


def _tokenized_slices(
    records: Sequence[Record],
    indices: Sequence[int],
    original: Sequence[int],
    names: Sequence[str],
    field_name: str,
    client: str,
    objective: Objective,
    tokenizer: PreTrainedTokenizerBase,
    config: ExperimentConfig,
) -> dict[str, list[Any]]:
    """One client's examples per slice (a slice it has no record of is left out); ``original[i]``: record i's index
    in ``data.train``, for errors."""
    out: dict[str, list[Any]] = {}
    for name in names:
        mine = [i for i in indices if str(records[i][field_name]) == name]
        if mine:
            where = [f"data.train example {original[i]}" for i in mine]
            out[name] = objective.train_examples([records[i] for i in mine], tokenizer, config.data, f"client {client!r} slice {name!r}", where)
    return out
