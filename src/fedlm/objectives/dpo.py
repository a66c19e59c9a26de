"""``objective: dpo``: Direct Preference Optimization (Rafailov, Sharma, Mitchell, Ermon, Manning & Finn 2023,
"Direct Preference Optimization: Your Language Model is Secretly a Reward Model", NeurIPS), Eq. 7::

    L = -log sigmoid( beta * [ (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)) ] )

with log pi(y|x) the summed log-probability of the answer tokens under the policy (the model with the adapter)
and ref the reference policy: the **base model with the adapter disabled** (``PeftModel.disable_adapter()``), so
no second copy of the model exists; its log-probabilities carry no gradient. With ``reference: init_adapter`` the
reference is instead the adapter the run started from (``model.init_adapter``, e.g. the SFT stage's), as in the
paper, where pi_ref = pi_SFT: its tensors are swapped into the same adapter for the reference pass and swapped back
(still no second model); round 0 then has every margin exactly 0 and the loss exactly log 2. The implicit rewards are
r_c = beta (log pi(y_c|x) - log ref(y_c|x)) and r_r likewise; the reward margin is r_c - r_r and preference
accuracy the share of pairs with margin > 0 (TRL's ``rewards/accuracies``).

Records: ``prompt``/``chosen``/``rejected`` strings, or chat format: ``chosen``/``rejected`` as message lists that
share the prompt (every message but the last), with or without a ``prompt`` column (a string or a message list).
Both answers are tokenised after the prompt with the chat template; the labels cover the final answer only
(content and end-of-turn token). A batch holds the chosen sequences first, then the rejected ones: (2B, T).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from fedlm.core.errors import FedlmError
from fedlm.data.collate import collate_for_loss
from fedlm.data.formats import Message
from fedlm.data.prepare import TestExample
from fedlm.data.tokenize import IGNORE_INDEX, TokenizedExample, render
from fedlm.models.adapters import load_trainable_state, trainable_state
from fedlm.objectives.base import Batch, Objective, columns_error, register_objective, sequence_logps

if TYPE_CHECKING:
    from fedlm.config.schema import DataConfig, ExperimentConfig
    from fedlm.data.prepare import TestExample
    from fedlm.data.readers import Record

NEEDED = "`prompt`, `chosen` and `rejected` (or `chosen`/`rejected` as chat message lists that share the prompt)"
_ROLES = ("system", "user", "assistant")


class DPOParams(BaseModel):
    """``objective: {name: dpo, beta: 0.1}``."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0.0, allow_inf_nan=False, description="strength of the KL penalty toward the reference")
    reference: Literal["base", "init_adapter"] = Field(
        "base", description="base: the base model, adapter disabled; init_adapter: the adapter of `model.init_adapter` (pi_SFT)"
    )


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt with its chosen and rejected answers, each tokenised with labels on the answer only."""

    chosen: TokenizedExample
    rejected: TokenizedExample


def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses (Rafailov et al. 2023, Eq. 7) and the implicit rewards of the chosen and rejected
    answers; every argument is a (B,) tensor of summed answer log-probabilities."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_rewards = beta * (policy_rejected - ref_rejected)  # (B,)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


@contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The reference policy: the same model with its adapter switched off (no copy)."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise FedlmError("`objective: dpo` uses the base model with the adapter disabled as its reference, but this model has no adapter")
    with disable():
        yield


@contextmanager
def adapter_swapped(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """The reference policy ``state`` (trainable tensors) in the model's adapter, the current tensors restored after.
    The swap is in place: run it before the policy's forward pass of the same step, never between it and backward."""
    current = trainable_state(model)
    load_trainable_state(model, state)
    try:
        yield
    finally:
        load_trainable_state(model, current)


def reference_logps(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Summed answer log-probabilities under the reference, no gradient: the adapter disabled, or the adapter
    tensors ``state`` when given. Shape (B,)."""
    with torch.no_grad(), adapter_disabled(model) if state is None else adapter_swapped(model, state):
        return sequence_logps(model, batch)[0]


def pair_rewards(
    model: torch.nn.Module,
    batch: Batch,
    beta: float,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO losses and chosen/rejected rewards of a (2B, T) batch (chosen rows first)."""
    ref = reference_logps(model, batch, reference)  # (2B,)
    policy = sequence_logps(model, batch)[0]  # (2B,)
    half = policy.shape[0] // 2
    return dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], beta)


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Mean reward margin, preference accuracy (margin > 0) and mean chosen/rejected rewards."""
    margin = (chosen - rejected).detach()
    return {
        "reward_margin": float(margin.mean()),
        "preference_accuracy": float((margin > 0).float().mean()),
        "chosen_reward": float(chosen.detach().mean()),
        "rejected_reward": float(rejected.detach().mean()),
    }


@register_objective
class DPOObjective(Objective):
    """DPO on preference pairs; the reference is the adapter-disabled base model or the starting adapter."""

    name: ClassVar[str] = "dpo"
    Params: ClassVar[type[BaseModel]] = DPOParams
    params: DPOParams
    #: ``reference: init_adapter``: the adapter tensors the run started from (set by the session after loading them)
    reference_state: Mapping[str, torch.Tensor] | None = None

    @property
    def beta(self) -> float:
        return float(self.params.beta)

    @property
    def reference(self) -> Mapping[str, torch.Tensor] | None:
        """The reference's adapter tensors (None: the adapter disabled); refuses a missing ``init_adapter`` state."""
        if self.params.reference == "base":
            return None
        if self.reference_state is None:
            raise FedlmError("`objective.reference: init_adapter` needs the starting adapter loaded (`model.init_adapter`)")
        return self.reference_state

    def check_config(self, config: ExperimentConfig) -> None:
        if config.peft.method == "full":
            raise FedlmError(
                "`objective: dpo` needs an adapter (`peft.method` other than `full`): its reference policy is the base "
                "model with the adapter disabled, and with `full` no frozen base model is kept"
            )
        if config.privacy.sample_dp is not None:
            raise FedlmError(
                "`privacy.sample_dp` cannot run with `objective: dpo`: DP-SGD clips each example's gradient of the token "
                "cross-entropy, not of the DPO pair loss; use `privacy.client_dp` (client-level DP) or `objective: sft`"
            )
        if self.params.reference == "init_adapter" and config.model.init_adapter is None:
            raise FedlmError(
                "`objective.reference: init_adapter` makes the adapter the run starts from the DPO reference, but "
                "`model.init_adapter` is not set; give the earlier stage's adapter folder or use `reference: base`"
            )
        if config.data.format != "auto":
            raise FedlmError(
                f"`data.format: {config.data.format}` applies to `objective: sft`; preference data for `objective: dpo` needs `data.format: auto`"
            )

    def check_records(self, records: Sequence[Record], field_name: str, data: DataConfig) -> None:
        columns = set(records[0]) if records else set()
        chat = isinstance(records[0].get("chosen"), list) if records else False
        if not {"chosen", "rejected"} <= columns or ("prompt" not in columns and not chat):
            raise columns_error(field_name, self.name, NEEDED, records)

    def train_examples(
        self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataConfig, who: str, where: Sequence[str]
    ) -> list[PreferenceExample]:
        pairs = [tokenize_pair(tokenizer, *to_pair(r, data.system_prompt, w), data.max_length) for r, w in zip(records, where)]
        pairs = [p for p in pairs if p.chosen.num_target_tokens > 0 and p.rejected.num_target_tokens > 0]
        if not pairs:
            raise FedlmError(
                f"{who} has no preference pair whose answers start within `data.max_length` ({data.max_length}); raise `data.max_length`"
            )
        return pairs

    def test_examples(
        self,
        records: Sequence[Record],
        tokenizer: PreTrainedTokenizerBase,
        data: DataConfig,
        owners: Sequence[str | None],
        where: str,
    ) -> list[TestExample]:
        out = []
        for i, (record, owner) in enumerate(zip(records, owners)):
            prompt, chosen, rejected = to_pair(record, data.system_prompt, f"{where} example {i}")
            pair = tokenize_pair(tokenizer, prompt, chosen, rejected, data.max_length)
            out.append(TestExample(record, prompt, chosen, pair.chosen, owner, rejected=pair.rejected))
        return out

    def collate(self, examples: Sequence[PreferenceExample], pad_id: int) -> Batch:
        """Chosen sequences, then rejected ones, right-padded into one (2B, T) batch."""
        return collate_for_loss([p.chosen for p in examples] + [p.rejected for p in examples], pad_id)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        losses, chosen, rejected = pair_rewards(model, batch, self.beta, self.reference)
        return losses.mean(), reward_metrics(chosen, rejected)

    def loss_items(self, batch: Batch) -> int:
        """The loss is a mean over pairs: half the rows."""
        return batch["input_ids"].shape[0] // 2

    def split_batch(self, batch: Batch, parts: int) -> list[Batch]:
        """Whole pairs: each part keeps its pairs' chosen rows, then their rejected rows."""
        half = batch["input_ids"].shape[0] // 2
        return [{k: torch.cat([v[idx], v[idx + half]]) for k, v in batch.items()} for idx in torch.tensor_split(torch.arange(half), parts)]

    def score_batch(self, model: torch.nn.Module, chunk: Sequence[TestExample], pad_id: int, device: torch.device) -> list[dict[str, float]]:
        pairs = [PreferenceExample(ex.tokens, _rejected(ex)) for ex in chunk]
        batch = {k: v.to(device) for k, v in self.collate(pairs, pad_id).items()}
        ref, policy = reference_logps(model, batch, self.reference), sequence_logps(model, batch)[0]  # (2B,) each
        half = policy.shape[0] // 2
        losses, chosen, rejected = dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], self.beta)
        prefers = (policy[:half] > policy[half:]).tolist()  # the model's own likelihood, no reference
        return [
            {"dpo_loss": loss, "chosen_reward": c, "rejected_reward": r, "reward_margin": c - r, "prefers_chosen": float(own)}
            for loss, c, r, own in zip(losses.tolist(), chosen.tolist(), rejected.tolist(), prefers)
        ]

    def summarize(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        n = max(len(rows), 1)
        return {
            "loss": sum(r["dpo_loss"] for r in rows) / n,
            "preference_accuracy": sum(r["reward_margin"] > 0 for r in rows) / n,
            "reward_margin": sum(r["reward_margin"] for r in rows) / n,
            "chosen_reward": sum(r["chosen_reward"] for r in rows) / n,
            "rejected_reward": sum(r["rejected_reward"] for r in rows) / n,
            # reference-free: the share of pairs whose chosen answer the model itself finds likelier (meaningful
            # at round 0 too, where every reward margin is 0 and preference_accuracy is 0 by definition)
            "likelihood_accuracy": sum(r.get("prefers_chosen", 0.0) for r in rows) / n,
        }


def _rejected(example: TestExample) -> TokenizedExample:
    """The rejected answer of a DPO test example (every example the DPO objective builds has one)."""
    if example.rejected is None:
        raise ValueError("a DPO test example has no rejected answer; build the test set with the dpo objective")
    return example.rejected


def to_pair(record: Record, system_prompt: str | None, where: str) -> tuple[list[Message], str, str]:
    """(prompt messages, chosen answer, rejected answer) of a record in either format."""
    prompt = record.get("prompt")
    prefix = [] if prompt is None else [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, where, "prompt")
    full = {}
    for key in ("chosen", "rejected"):
        value = record.get(key)
        full[key] = prefix + ([{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, where, key))
        if full[key][-1]["role"] != "assistant":
            raise FedlmError(f"{where}: `{key}` must end with the assistant's answer (role assistant)")
    if full["chosen"][:-1] != full["rejected"][:-1]:
        raise FedlmError(f"{where}: `chosen` and `rejected` must share the prompt (every message but the last)")
    messages = full["chosen"][:-1]
    if not messages:
        raise FedlmError(f"{where}: no prompt; give a `prompt` column or chat lists with the user's turn before the answer")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages, full["chosen"][-1]["content"], full["rejected"][-1]["content"]


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, prompt: list[Message], chosen: str, rejected: str, max_length: int) -> PreferenceExample:
    """Both answers after the prompt, labels on the answer tokens only, cut from the right at ``max_length``."""
    prompt_ids = render(tokenizer, prompt, add_generation_prompt=True)

    def one(answer: str) -> TokenizedExample:
        full_ids = render(tokenizer, [*prompt, {"role": "assistant", "content": answer}], add_generation_prompt=False)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise FedlmError(
                "the tokenizer's chat template does not render conversations prefix-consistently, so answer tokens "
                "cannot be located; use a model with a ChatML-like template"
            )
        labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :]
        return TokenizedExample(full_ids[:max_length], labels[:max_length])

    return PreferenceExample(one(chosen), one(rejected))


def _messages(value: Any, where: str, key: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise FedlmError(f"{where}: `{key}` must be a string or a non-empty list of {{role, content}} messages")
    out = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get("role") not in _ROLES or not isinstance(turn.get("content"), str):
            raise FedlmError(f"{where}: each message of `{key}` needs `role` (system|user|assistant) and string `content`, got {turn!r}")
        out.append({"role": turn["role"], "content": turn["content"]})
    return out
