"""The server's validation set and the loss a coalition's model scores on it (the utility's price)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from math import ceil

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.data.prepare import TestExample, subsample
from fedlm.data.readers import read_records
from fedlm.models.adapters import load_trainable_state
from fedlm.objectives import Objective

FIELD = "contribution.validation"


def validation_examples(config: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, objective: Objective) -> list[TestExample]:
    """The examples of ``contribution.validation`` (a seeded subsample of ``contribution.validation_examples``),
    checked and tokenized by the run's objective like the test set."""
    section = config.contribution
    if section.validation is None:
        raise FedlmError(f"`{FIELD}` is required for contribution scores")
    records = read_records(section.validation, FIELD)
    if not records:
        raise FedlmError(f"`{FIELD}` {section.validation!r} holds no examples")
    limit = section.validation_examples
    if limit is not None and len(records) > limit:
        records = subsample(records, limit, derive_seed(config.seed, "contribution-validation"))
    objective.check_records(records, FIELD, config.data)
    examples = objective.test_examples(records, tokenizer, config.data, [None] * len(records), FIELD)
    if not examples:
        raise FedlmError(f"`{FIELD}` {section.validation!r} leaves no usable example for `objective: {objective.name}`")
    return examples


@dataclass
class ValidationLoss:
    """The run objective's token-mean loss (DPO: its pair loss) of an adapter state on the validation examples,
    computed as the evaluator computes the test loss (:meth:`fedlm.objectives.Objective.score`). Counts the batched
    forward passes it ran (the server's cost of contribution scores)."""

    model: torch.nn.Module
    examples: list[TestExample]
    objective: Objective
    pad_id: int
    device: torch.device
    batch_size: int
    forward_passes: int = field(default=0, init=False)

    @property
    def passes_per_call(self) -> int:
        """Batched forward passes one loss costs."""
        return ceil(len(self.examples) / self.batch_size)

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        load_trainable_state(self.model, state)
        self.model.eval()
        with torch.no_grad():
            rows = self.objective.score(self.model, self.examples, self.pad_id, self.device, self.batch_size, None)
        self.forward_passes += self.passes_per_call
        return float(self.objective.summarize(rows)["loss"])
