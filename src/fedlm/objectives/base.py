"""What a training objective is: the columns it reads, how records become examples and batches, the loss a local
step minimises and the metrics a held-out evaluation reports. One small module per objective, one registry.

The trainer, the evaluator and data preparation call only this interface, so aggregators, runtimes, privacy
wrappers and the attack harness never need to know the objective.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from transformers import PreTrainedTokenizerBase

from fedlm.core.errors import FedlmError
from fedlm.core.params import validate_params
from fedlm.core.registry import Registry
from fedlm.data.collate import collate_for_loss
from fedlm.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    from fedlm.config.schema import DataConfig, ExperimentConfig
    from fedlm.data.prepare import TestExample
    from fedlm.data.readers import Record

Example = Any  # an objective's training example: a TokenizedExample (sft, clm) or a PreferenceExample (dpo)
Batch = dict[str, torch.Tensor]


class NoParams(BaseModel):
    """An objective without parameters of its own: any key beside ``name`` is refused."""

    model_config = ConfigDict(extra="forbid")


class Objective(ABC):
    """A training objective. ``Params`` is the pydantic model of its config keys beside ``objective.name``."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    generates: ClassVar[bool] = False  # the evaluator adds generation metrics (when ``eval.generate``)

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = params if params is not None else self.Params()

    # ----------------------------------------------------------------------------------------- data

    @abstractmethod
    def check_records(self, records: Sequence[Record], field_name: str, data: DataConfig) -> None:
        """Raise :class:`FedlmError` naming the columns found and the columns needed when ``records`` do not fit."""

    @abstractmethod
    def train_examples(
        self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataConfig, who: str, where: Sequence[str]
    ) -> list[Example]:
        """The training examples of ``who`` (e.g. ``client 'a'``) from its records (``where[i]`` names record i in
        errors). Examples without a target token are dropped; none left is a :class:`FedlmError` that says why."""

    @abstractmethod
    def test_examples(
        self,
        records: Sequence[Record],
        tokenizer: PreTrainedTokenizerBase,
        data: DataConfig,
        owners: Sequence[str | None],
        where: str,
    ) -> list[TestExample]:
        """Held-out examples; ``owners[i]`` is the client whose test share record i belongs to (None: global only)."""

    def check_config(self, config: ExperimentConfig) -> None:  # noqa: B027 - a hook: the default accepts all
        """Refuse, at config load, settings this objective cannot honour (default: none)."""

    # ------------------------------------------------------------------------------------- training

    def collate(self, examples: Sequence[Example], pad_id: int) -> Batch:
        """A padded batch; the default pads ``input_ids``/``labels`` (B, T) with the loss on non-ignored labels."""
        return collate_for_loss(examples, pad_id)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss to backpropagate and the step's metrics. Default: the token-mean cross-entropy over the
        labelled next tokens, as Hugging Face's ``model(labels=...).loss`` computes it, but with logits only where a
        label counts (:func:`sequence_logps`)."""
        logps, counts = sequence_logps(model, batch)
        return -logps.sum() / counts.sum().clamp(min=1), {}

    def loss_items(self, batch: Batch) -> int:
        """How many items :meth:`loss` is a mean over (default: the labelled next-token targets, as the model counts
        them), so that data-parallel shards can be weighted to the mean over the whole batch."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def split_batch(self, batch: Batch, parts: int) -> list[Batch]:
        """``batch`` cut into ``parts`` batches of whole examples, in order (default: contiguous rows, as
        ``torch.tensor_split``), for data-parallel processes."""
        rows = torch.tensor_split(torch.arange(batch["input_ids"].shape[0]), parts)
        return [{k: v[idx] for k, v in batch.items()} for idx in rows]

    # ----------------------------------------------------------------------------------- evaluation

    def score(
        self,
        model: torch.nn.Module,
        test: Sequence[TestExample],
        pad_id: int,
        device: torch.device,
        batch_size: int,
        advance: Callable[[int], None] | None = None,
    ) -> list[dict[str, float]]:
        """Per-example scores of the held-out set, batch by batch through :meth:`score_batch` (no gradient)."""
        rows: list[dict[str, float]] = []
        with torch.no_grad():
            for start in range(0, len(test), batch_size):
                chunk = test[start : start + batch_size]
                rows.extend(self.score_batch(model, chunk, pad_id, device))
                if advance is not None:
                    advance(len(chunk))
        return rows

    def score_batch(self, model: torch.nn.Module, chunk: Sequence[TestExample], pad_id: int, device: torch.device) -> list[dict[str, float]]:
        """Scores of one batch of held-out examples (default: summed NLL ``nll`` over ``num_tokens`` target tokens)."""
        batch = {k: v.to(device) for k, v in collate_for_loss([ex.tokens for ex in chunk], pad_id).items()}
        logps, counts = sequence_logps(model, batch)
        return [{"nll": -lp, "num_tokens": n} for lp, n in zip(logps.tolist(), counts.tolist())]

    def summarize(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """A split's metrics from its examples' scores (default: token-mean loss and its perplexity)."""
        tokens = sum(r["num_tokens"] for r in rows)
        loss = sum(r["nll"] for r in rows) / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def sequence_logps(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its labelled tokens (next-token, so logits t predict labels t+1), and
    how many tokens that is. Shapes (B,), (B,). Where the model can (``logits_to_keep``), logits are computed only
    at the positions whose next token is labelled in some row: a short answer after a long prompt then costs one
    vocabulary projection per answer token, not per prompt token. Otherwise only the last T logits are read: prompt
    tuning prepends its virtual tokens' positions to the output."""
    width = batch["input_ids"].shape[1]
    target = batch["labels"][:, 1:]  # (B, T-1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if keeps_logits(model):
        keep = (target != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # (K,) positions t whose label t+1 counts
        logits = model(**inputs, logits_to_keep=keep).logits.float()  # (B, K, V)
        target = target[:, keep]
    else:
        logits = model(**inputs).logits[:, -width:-1].float()  # (B, T-1, V)
    rows, positions, vocab = logits.shape
    token_nll = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    token_nll = token_nll.view(rows, positions)
    return -token_nll.sum(dim=1), (target != IGNORE_INDEX).sum(dim=1)


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether ``model``'s output positions are its input positions and its forward takes ``logits_to_keep`` (the
    causal LMs of transformers do; prompt-learning PEFT methods add virtual positions, so they do not qualify)."""
    inner: Any = model
    while True:
        if getattr(getattr(inner, "active_peft_config", None), "is_prompt_learning", False):
            return False
        unwrapped = getattr(inner, "_module", None) or getattr(inner, "module", None)  # Opacus, DDP
        get_base_model = getattr(inner, "get_base_model", None)  # peft
        if callable(get_base_model):
            unwrapped = get_base_model()
        if unwrapped is None or unwrapped is inner:
            break
        inner = unwrapped
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def columns_error(field_name: str, objective: str, needed: str, records: Sequence[Record]) -> FedlmError:
    """The one error for data that does not fit an objective: the columns it has and the columns it needs."""
    found = ", ".join(f"`{c}`" for c in sorted(records[0])) if records else "none"
    return FedlmError(f"`{field_name}` does not fit `objective: {objective}`: it needs {needed}; it has columns {found}")


# ------------------------------------------------------------------------------------------- registry

OBJECTIVES: Registry[type[Objective]] = Registry(
    "objective", "objective.name", builtin=[f"fedlm.objectives.{name}" for name in ("sft", "clm", "dpo")]
)
"""Every objective by its ``objective.name``; a module registers its class with :func:`register_objective`."""


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` buildable by its ``name``."""
    return OBJECTIVES.register(cls.name, cls)


def build_objective(name: str, params: Mapping[str, Any] | None = None) -> Objective:
    """The objective ``name`` with its parameters; an unknown name lists the valid ones, a bad parameter names
    ``objective.<field>``."""
    cls = OBJECTIVES.get(name)
    return cls(validate_params(cls.Params, params or {}, "objective", "objective", name))
