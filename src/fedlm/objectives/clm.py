"""``objective: clm``: causal language modelling on raw text, for federated continued pre-training (domain-adaptive
pre-training, Gururangan et al. 2020, "Don't Stop Pretraining", here on each client's own documents).

Records carry a ``text`` column (JSONL, CSV, Parquet, a ``datasets`` folder) or come from ``.txt`` files, one
document each. Packing, as in GPT-2/GPT-3 pre-training and Hugging Face's ``run_clm.py`` ``group_texts``:
each document is tokenised without special tokens, EOS is appended as the document separator, the documents are
concatenated in order and cut into blocks of exactly ``block_size`` tokens (``objective.block_size``, default
``data.max_length``). No padding is needed and no token is lost, except the **final remainder shorter than one
block**, which is dropped (at most ``block_size - 1`` tokens per client). Labels equal the inputs: the model shifts
them internally, so every token of a block after the first is predicted from those before it. A client packs only
its own documents, so blocks never mix clients' text.

Held-out evaluation: token-mean loss and perplexity, no generation. The global test set packs all held-out documents
together (only its one final partial block is dropped); each client's test share is its own documents packed apart,
reported only for clients whose test text fills at least one block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from fedlm.core.errors import FedlmError
from fedlm.data.prepare import TestExample
from fedlm.data.tokenize import TokenizedExample
from fedlm.objectives.base import Objective, columns_error, register_objective

if TYPE_CHECKING:
    from fedlm.config.schema import DataConfig, ExperimentConfig
    from fedlm.data.prepare import TestExample
    from fedlm.data.readers import Record

TEXT_COLUMN = "text"


class CLMParams(BaseModel):
    """``objective: {name: clm, block_size: 512}``."""

    model_config = ConfigDict(extra="forbid")

    block_size: int | None = Field(None, ge=2, description="tokens per packed block; default `data.max_length`")


def pack_blocks(documents: Sequence[Sequence[int]], eos_id: int, block_size: int) -> list[list[int]]:
    """Concatenate ``doc + [eos]`` for every document and cut the stream into ``block_size``-token blocks; the final
    remainder shorter than a block is dropped."""
    stream = [token for doc in documents for token in (*doc, eos_id)]
    return [stream[start : start + block_size] for start in range(0, len(stream) - block_size + 1, block_size)]


@register_objective
class CLMObjective(Objective):
    """Packed causal-LM loss on raw text documents."""

    name: ClassVar[str] = "clm"
    Params: ClassVar[type[BaseModel]] = CLMParams
    params: CLMParams

    def block_size(self, data: DataConfig) -> int:
        """``objective.block_size``, or ``data.max_length``."""
        return self.params.block_size or data.max_length

    def check_config(self, config: ExperimentConfig) -> None:
        if config.data.format != "auto":
            raise FedlmError(
                f"`data.format: {config.data.format}` applies to `objective: sft`; raw text for `objective: clm` is read from the `text` column, so leave `data.format: auto`"
            )

    def check_records(self, records: Sequence[Record], field_name: str, data: DataConfig) -> None:
        if not records or TEXT_COLUMN not in records[0]:
            raise columns_error(field_name, self.name, "a `text` column (raw documents; or `.txt` files, one document each)", records)
        for i, record in enumerate(records):
            if not isinstance(record.get(TEXT_COLUMN), str):
                raise FedlmError(f"`{field_name}` example {i}: `text` must be a string, got {type(record.get(TEXT_COLUMN)).__name__}")

    def documents(self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        """Each record's ``text`` as token ids, without special tokens (EOS is added by :func:`pack_blocks`)."""
        if not records:
            return []
        return tokenizer([str(r[TEXT_COLUMN]) for r in records], add_special_tokens=False)["input_ids"]

    def blocks(self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataConfig, who: str) -> list[TokenizedExample]:
        """``records`` packed into blocks with labels = inputs; a text too short for one block is an error."""
        size = self.block_size(data)
        documents = self.documents(records, tokenizer)
        blocks = pack_blocks(documents, _eos_id(tokenizer), size)
        if not blocks:
            total = sum(len(d) + 1 for d in documents)
            raise FedlmError(
                f"{who}: its text gives {total} tokens ({len(records)} document(s) with EOS), fewer than one block of {size}; "
                "give more text, or lower `objective.block_size` (default `data.max_length`)"
            )
        return [TokenizedExample(input_ids=block, labels=list(block)) for block in blocks]

    def train_examples(
        self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataConfig, who: str, where: Sequence[str]
    ) -> list[TokenizedExample]:
        return self.blocks(records, tokenizer, data, who)

    def test_examples(
        self,
        records: Sequence[Record],
        tokenizer: PreTrainedTokenizerBase,
        data: DataConfig,
        owners: Sequence[str | None],
        where: str,
    ) -> list[TestExample]:
        size, eos = self.block_size(data), _eos_id(tokenizer)
        documents = self.documents(records, tokenizer)
        out: list[TestExample] = []
        for block in pack_blocks(documents, eos, size):  # the global test set: every document, packed together
            out.append(TestExample({"block": len(out), "documents": len(records)}, [], "", TokenizedExample(block, list(block)), None))
        if not out:
            total = sum(len(d) + 1 for d in documents)
            raise FedlmError(
                f"`{where}`: all {len(records)} held-out document(s) together give {total} tokens (with EOS), fewer than one "
                f"block of {size}; give more test text, or lower `objective.block_size` (default `data.max_length`)"
            )
        groups: dict[str, list[list[int]]] = {}
        for doc, owner in zip(documents, owners):
            if owner is not None:
                groups.setdefault(owner, []).append(doc)
        for owner, docs in groups.items():  # each client's share, packed apart; none for a client short of a block
            for block in pack_blocks(docs, eos, size):
                record = {"block": len(out), "documents": len(docs)}
                out.append(TestExample(record, [], "", TokenizedExample(block, list(block)), owner, in_global=False))
        return out


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise FedlmError("`objective: clm` separates documents with the tokenizer's EOS token, and this tokenizer has none")
    return int(tokenizer.eos_token_id)
