"""``objective: sft``: supervised instruction tuning (Ouyang et al. 2022; in the federated setting Ye et al. 2024,
OpenFedLLM): Alpaca or chat ``messages`` records through the model's chat template, cross-entropy on the answer
tokens only. Held-out evaluation: loss, perplexity and (with ``eval.generate``) generation metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from transformers import PreTrainedTokenizerBase

from fedlm.core.errors import FedlmError
from fedlm.data.formats import detect_format, to_messages
from fedlm.data.prepare import build_test_examples
from fedlm.data.tokenize import TokenizedExample, tokenize_conversation
from fedlm.objectives.base import Objective, register_objective

if TYPE_CHECKING:
    from fedlm.config.schema import DataConfig
    from fedlm.data.prepare import TestExample
    from fedlm.data.readers import Record


@register_objective
class SFTObjective(Objective):
    """Chat-template tokenisation with the loss on every assistant turn (the model's own shifted cross-entropy)."""

    name: ClassVar[str] = "sft"
    generates: ClassVar[bool] = True

    def check_records(self, records: Sequence[Record], field_name: str, data: DataConfig) -> None:
        detect_format(records, data.format, field_name)

    def train_examples(
        self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataConfig, who: str, where: Sequence[str]
    ) -> list[TokenizedExample]:
        fmt = detect_format(records, data.format, where[0]) if records else "alpaca"
        examples = [tokenize_conversation(tokenizer, to_messages(r, fmt, data.system_prompt, w), data.max_length) for r, w in zip(records, where)]
        examples = [ex for ex in examples if ex.num_target_tokens > 0]
        if not examples:
            raise FedlmError(
                f"{who} has no training example with response tokens within `data.max_length` ({data.max_length}); raise `data.max_length`"
            )
        return examples

    def test_examples(
        self,
        records: Sequence[Record],
        tokenizer: PreTrainedTokenizerBase,
        data: DataConfig,
        owners: Sequence[str | None],
        where: str,
    ) -> list[TestExample]:
        return build_test_examples(list(records), detect_format(records, data.format, where), data, tokenizer, where, list(owners))
