"""Backdoor attack success: the global model's answers to test prompts that carry the attacker's trigger.

The attack success rate is the fraction of triggered test prompts whose greedy answer contains the attacker's
target response (case-insensitive), the metric of Bagdasaryan et al. 2020 and Wang et al. 2020 for backdoors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.attacks.data_poisoning import triggered_prompts
from fedlm.config.schema import ExperimentConfig
from fedlm.data.formats import detect_format
from fedlm.data.prepare import TestExample, build_test_examples
from fedlm.evaluation.evaluator import Evaluator

BACKDOOR_SPLIT = "backdoor_test"


def triggered_test_set(
    test: Sequence[TestExample], config: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, trigger: str, target: str
) -> list[TestExample]:
    """Every test example with ``trigger`` in its prompt and ``target`` as its reference."""
    records = triggered_prompts([ex.record for ex in test], trigger, target)
    fmt = detect_format(records, config.data.format, "data.test")
    return build_test_examples(records, fmt, config.data, tokenizer, "triggered test")


@dataclass
class BackdoorProbe:
    """Scores an adapter state on the triggered test set; ``evaluator`` generates on those examples."""

    evaluator: Evaluator
    target: str

    def evaluate(self, state: Mapping[str, torch.Tensor] | None, round_num: int) -> list[dict[str, Any]]:
        """One ``backdoor_test`` record: attack success rate, and the loss of the target answer."""
        result = self.evaluator.evaluate(state, round_num, f"backdoor probe round {round_num}")
        answers = [row["prediction"] or "" for row in result.predictions]
        hits = sum(self.target.lower() in answer.lower() for answer in answers)
        return [
            {
                "round": round_num,
                "split": BACKDOOR_SPLIT,
                "client": None,
                "num_examples": len(answers),
                "attack_success_rate": hits / max(len(answers), 1),
                "target_loss": result.records[0]["loss"],
            }
        ]
