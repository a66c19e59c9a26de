"""Evaluating a global (or any) adapter state on the test set, with the metrics of the run's objective:
``sft`` loss, perplexity and generation metrics; ``clm`` loss and perplexity on held-out blocks; ``dpo`` preference
accuracy, reward margin and chosen/rejected rewards on held-out pairs (:meth:`fedlm.objectives.Objective.score`).

Scores are computed once per example and grouped, so the global test set and every client's test share cost one
pass; likewise generation runs once on the global test set and the per-client metrics group its predictions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedlm.config.schema import EvalConfig
from fedlm.data.collate import collate_prompts
from fedlm.data.prepare import TestExample
from fedlm.data.tokenize import tokenize_prompt
from fedlm.evaluation.multiple_choice import Question, build_question, choice_logliks, predicted_choice
from fedlm.evaluation.text_metrics import exact_match, rouge_l
from fedlm.models.adapters import load_trainable_state
from fedlm.objectives import Objective, build_objective
from fedlm.reporting.progress import Progress

GLOBAL_SPLIT = "global_test"


@dataclass
class EvalResult:
    """``metrics.jsonl`` records (global and per-client splits) and one prediction row per test example."""

    records: list[dict[str, Any]]
    predictions: list[dict[str, Any]]


@dataclass
class Evaluator:
    """Scores adapter states on a fixed test set."""

    model: PeftModel | PreTrainedModel  # PreTrainedModel itself for `peft.method: full`
    tokenizer: PreTrainedTokenizerBase
    test: Sequence[TestExample]
    config: EvalConfig
    device: torch.device
    max_prompt_length: int
    progress: Progress | None = None
    objective: Objective = field(default_factory=lambda: build_objective("sft"))
    label: str = "model"  # which model is evaluated, on the progress bars (e.g. "federated round 3", "base")
    _questions: list[Question | None] | None = field(default=None, init=False, repr=False)

    def evaluate(self, state: Mapping[str, torch.Tensor] | None, round_num: int, label: str | None = None) -> EvalResult:
        """Evaluate ``state`` (None: the model as it is, e.g. adapter disabled by the caller) at ``round_num``;
        ``label`` names the model on the progress bars (default :attr:`label`)."""
        if state is not None:
            load_trainable_state(self.model, state)
        self.model.eval()
        name = label or self.label
        scores = self._scores(name)
        generations = self._generate(name) if self._generates else [None] * len(self.test)
        rows = [self._prediction_row(ex, gen, score) for ex, gen, score in zip(self.test, generations, scores)]
        self._choose(rows, name)
        groups: dict[str | None, list[int]] = {None: [i for i, ex in enumerate(self.test) if ex.in_global]}
        for i, ex in enumerate(self.test):
            if ex.client is not None:
                groups.setdefault(ex.client, []).append(i)
        records = [self._record(round_num, client, idx, rows) for client, idx in groups.items()]
        return EvalResult(records=records, predictions=rows)

    @property
    def _generates(self) -> bool:
        return self.config.generate and self.objective.generates

    def _scores(self, name: str) -> list[dict[str, float]]:
        """The objective's per-example scores (sft, clm: summed NLL ``nll`` over ``num_tokens`` target tokens)."""
        task = self.progress.task(f"{name}: loss", len(self.test)) if self.progress else None
        scores = self.objective.score(
            self.model, self.test, self.tokenizer.pad_token_id, self.device, self.config.batch_size, task.advance if task else None
        )
        if task is not None:
            task.done()
        return scores

    def _choose(self, rows: list[dict[str, Any]], name: str) -> None:
        """Multiple-choice questions (test records with ``choices`` and ``label``): each row's length-normalised pick
        (``mc_choice``) and whether it is right (``mc_correct``)."""
        if not self.objective.generates:  # questions are answers to prompts: sft only
            return
        if self._questions is None:
            self._questions = [build_question(self.tokenizer, ex.prompt, ex.record, self.max_prompt_length) for ex in self.test]
        asked = [(i, q) for i, q in enumerate(self._questions) if q is not None]
        if not asked:
            return
        total = sum(len(q.answers) for _, q in asked)
        task = self.progress.task(f"{name}: choices", total) if self.progress else None
        logliks = choice_logliks(
            self.model, [q for _, q in asked], self.tokenizer.pad_token_id, self.device, self.config.batch_size, task.advance if task else None
        )
        if task is not None:
            task.done()
        for (i, question), scores in zip(asked, logliks):
            choice = predicted_choice(question, scores)
            rows[i]["mc_choice"] = choice
            rows[i]["mc_correct"] = float(choice == question.label)

    def _generate(self, name: str) -> list[str]:
        """Greedy answers for every test prompt, batched, longest prompts first (less padding)."""
        prompts = [tokenize_prompt(self.tokenizer, ex.prompt, self.max_prompt_length) for ex in self.test]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        size = self.config.batch_size
        task = self.progress.task(f"{name}: generate", len(prompts)) if self.progress else None
        with torch.no_grad():
            for start in range(0, len(order), size):
                idx = order[start : start + size]
                batch = {k: v.to(self.device) for k, v in collate_prompts([prompts[i] for i in idx], self.tokenizer.pad_token_id).items()}
                out = self.model.generate(  # type: ignore[operator]  # PeftModel forwards it to PeftModelForCausalLM
                    **batch,
                    max_new_tokens=self.config.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                )
                new_tokens = out[:, batch["input_ids"].shape[1] :]  # (B, new)
                for i, text in zip(idx, self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    answers[i] = text.strip()
                if task is not None:
                    task.advance(len(idx))
        if task is not None:
            task.done()
        return answers

    def _prediction_row(self, ex: TestExample, generated: str | None, score: Mapping[str, float]) -> dict[str, Any]:
        row: dict[str, Any] = {
            "prompt": "\n".join(m["content"] for m in ex.prompt if m["role"] == "user"),
            "prediction": generated,
            "reference": ex.reference,
            "client": ex.client,
            **score,
        }
        for key, value in ex.record.items():
            row.setdefault(key, value)
        return row

    def _record(self, round_num: int, client: str | None, idx: list[int], rows: list[dict[str, Any]]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "round": round_num,
            "split": GLOBAL_SPLIT if client is None else f"client_{client}_test",
            "client": client,
            **self.objective.summarize([rows[i] for i in idx]),
            "num_examples": len(idx),
        }
        if self._generates:
            record["exact_match"] = sum(exact_match(rows[i]["prediction"], rows[i]["reference"]) for i in idx) / len(idx)
            record["rouge_l"] = sum(rouge_l(rows[i]["prediction"], rows[i]["reference"]) for i in idx) / len(idx)
        asked = [rows[i]["mc_correct"] for i in idx if "mc_correct" in rows[i]]
        if asked:
            record["mc_accuracy"] = sum(asked) / len(asked)
        return record
