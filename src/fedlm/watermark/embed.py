"""Embedding a watermark: fine-tune the adapter on trigger sets, without any client data.

WAFFLE's re-embedding (Tekgul et al. 2021, Sec. 4.2, "retraining" step): after every aggregation the server trains
the global model on its watermark set alone until it is re-learned, so the mark survives the clients' updates. Here
the server runs ``steps`` optimizer steps of the same :class:`~fedlm.federation.trainer.ClientTrainer` the clients
use (a fresh AdamW, gradient clipping, the SFT loss on the answer token) on the trigger conversations of
:mod:`fedlm.watermark.triggers`, starting from the aggregated adapter, and the result is the new global adapter.

Leak tracing marks each client's download a second time with its own trigger set (``client/<name>``) on top of the
shared one: the per-client copy is trained on both sets, so the shared mark is not eroded by the client's.

With ``until`` set, an embedding stops as soon as the marked model answers that share of its trigger set right:
WAFFLE re-trains after each aggregation only until the watermark accuracy reaches a threshold, so a round whose
aggregate still carries the mark costs no step at all and a later round only tops the mark up. The accuracy is the one ``fedlm
watermark verify`` reports (:mod:`fedlm.watermark.verify`), checked before the first step and after every
``check_every`` steps (each chunk of steps starts a fresh optimizer); ``steps`` is then the most it runs.

With ``retain`` > 0 every embedding also trains on that many conversations the model wrote itself just before
(:mod:`fedlm.watermark.retain`, written once per round by the model holding the first state that round marks: the
global state the clients download under ``per_client``, else the aggregate), so the steps teach the triggers without teaching every prompt a one-word answer.
With ``retain_loss: kl`` those conversations are not trained on as text but distilled: the state being marked scores
them first and the steps keep its next-token distributions there (:mod:`fedlm.watermark.distill`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.aggregation.lora_structure import pad_like
from fedlm.core.seeding import derive_seed
from fedlm.core.task import LocalPlan
from fedlm.core.update import TensorDict
from fedlm.data.tokenize import TokenizedExample
from fedlm.federation.trainer import ClientTrainer
from fedlm.models.adapters import load_trainable_state, trainable_state
from fedlm.watermark.distill import MarkObjective, distilled
from fedlm.watermark.retain import retain_examples
from fedlm.watermark.triggers import SHARED, Trigger, client_label, training_examples, trigger_set
from fedlm.watermark.verify import verify_triggers

WATERMARK_ID = "__watermark__"  # the trainer's client id for the server's own watermark steps


@dataclass(frozen=True)
class MarkSettings:
    """How marks are trained: the key, trigger-set sizes, steps, learning rate and batch size, the run's seed."""

    secret: str
    size: int
    steps: int
    lr: float
    batch_size: int
    client_size: int = 0
    client_steps: int = 0
    seed: int = 0
    retain: int = 0
    until: float | None = None  # stop an embedding once its trigger accuracy reaches this (WAFFLE's threshold)
    check_every: int = 5
    retain_loss: str = "sft"  # "sft": train on the retain conversations' text; "kl": distil the marked state's distributions


@dataclass(frozen=True)
class Embedding:
    """One embedding's outcome: the marked state, the mean trigger loss of its steps (None when it took none), the
    steps it took, and the trigger accuracy it stopped at (None without ``until``)."""

    state: TensorDict
    loss: float | None
    steps: int
    accuracy: float | None = None


def marked_state(state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> TensorDict:
    """``state`` with ``delta`` added to the tensors it names (a LoRA residual or frozen factor stays as it is)."""
    return {name: (value.to(torch.float32) + delta[name]).to(value.dtype) if name in delta else value for name, value in state.items()}


@dataclass
class Marker:
    """Trains watermarks into adapter states on the shared model (loaded before, and left holding the result)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    settings: MarkSettings
    _cache: dict[str, list[TokenizedExample]] = field(default_factory=dict)
    _retained: tuple[int, list[TokenizedExample]] | None = None  # (round, its retain conversations)

    def __post_init__(self) -> None:
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.trainer = ClientTrainer(self.model, self.pad_id, self.device, objective=MarkObjective())

    def examples(self, label: str, size: int) -> list[TokenizedExample]:
        """The tokenized trigger set ``label`` (cached)."""
        key = f"{label}#{size}"
        if key not in self._cache:
            self._cache[key] = training_examples(self.tokenizer, trigger_set(self.settings.secret, label, size))
        return self._cache[key]

    def retained(self, state: Mapping[str, torch.Tensor], round_num: int) -> list[TokenizedExample]:
        """Round ``round_num``'s retain conversations, written by the model holding ``state`` the first time the
        round asks (none when ``retain`` is 0)."""
        if self.settings.retain == 0:
            return []
        if self._retained is None or self._retained[0] != round_num:
            load_trainable_state(self.model, pad_like(state, trainable_state(self.model)))  # a copy may be cut to a rank
            seed = derive_seed(self.settings.seed, "watermark-retain", round_num)
            self._retained = (round_num, retain_examples(self.model, self.tokenizer, self.device, self.settings.retain, seed))
        return self._retained[1]

    def retain_for(self, state: Mapping[str, torch.Tensor], round_num: int) -> list[TokenizedExample]:
        """The round's retain conversations as the embedding of ``state`` trains on them: as they are, or (``kl``)
        with ``state``'s own top-k next tokens to keep."""
        examples = self.retained(state, round_num)
        if not examples or self.settings.retain_loss != "kl":
            return examples
        load_trainable_state(self.model, pad_like(state, trainable_state(self.model)))
        return list(distilled(self.model, examples, self.pad_id, self.device))

    def train(
        self,
        state: Mapping[str, torch.Tensor],
        examples: list[TokenizedExample],
        steps: int,
        seed: int,
        rank: int | None = None,
        frozen: str | None = None,
    ) -> tuple[TensorDict, float]:
        """(``state`` fine-tuned for ``steps`` steps on ``examples``, the mean trigger loss)."""
        s = self.settings
        plan = LocalPlan(0, [s.lr] * steps, min(s.batch_size, len(examples)), seed, rank, frozen)
        update = self.trainer.train(WATERMARK_ID, examples, state, plan)
        return marked_state(state, update.tensors), float(update.metrics["loss"])

    def accuracy(self, state: Mapping[str, torch.Tensor], triggers: list[Trigger], label: str) -> float:
        """The share of ``triggers`` the model holding ``state`` answers right (as ``verify`` scores it)."""
        load_trainable_state(self.model, pad_like(state, trainable_state(self.model)))
        return verify_triggers(self.model, self.tokenizer, self.device, triggers, label).accuracy

    def embed(
        self,
        state: Mapping[str, torch.Tensor],
        examples: list[TokenizedExample],
        steps: int,
        seed: int,
        checked: tuple[list[Trigger], str],
        rank: int | None = None,
        frozen: str | None = None,
    ) -> Embedding:
        """``state`` trained on ``examples``: ``steps`` steps, or with ``until`` only until the trigger set
        ``checked`` (triggers, label) is answered that well (checked every ``check_every`` steps)."""
        s = self.settings
        if s.until is None:
            marked, loss = self.train(state, examples, steps, seed, rank, frozen)
            return Embedding(marked, loss, steps)
        current, taken, losses = dict(state), 0, []
        accuracy = self.accuracy(current, *checked)
        while accuracy < s.until and taken < steps:
            chunk = min(s.check_every, steps - taken)
            current, loss = self.train(current, examples, chunk, derive_seed(seed, "chunk", taken), rank, frozen)
            losses.append(loss * chunk)
            taken += chunk
            accuracy = self.accuracy(current, *checked)
        return Embedding(current, sum(losses) / taken if taken else None, taken, accuracy)

    def mark_shared(self, state: Mapping[str, torch.Tensor], round_num: int, steps: int | None = None) -> Embedding:
        """The global adapter with the shared watermark re-embedded after round ``round_num``'s aggregation (round
        0: the initial model's pre-training); ``steps`` (default ``settings.steps``) is the most it runs."""
        s = self.settings
        examples = self.examples(SHARED, s.size) + self.retain_for(state, round_num)
        checked = (trigger_set(s.secret, SHARED, s.size), SHARED)
        return self.embed(state, examples, s.steps if steps is None else steps, derive_seed(s.seed, "watermark", round_num), checked)

    def mark_client(
        self, state: Mapping[str, torch.Tensor], client: str, round_num: int, rank: int | None = None, frozen: str | None = None
    ) -> Embedding:
        """``client``'s copy of ``state``: trained on its own trigger set and the shared one (leak tracing); with
        ``until``, until the client's own set is answered that well."""
        s = self.settings
        label = client_label(client)
        examples = self.examples(label, s.client_size) + self.examples(SHARED, s.size) + self.retain_for(state, round_num)
        checked = (trigger_set(s.secret, label, s.client_size), label)
        seed = derive_seed(s.seed, "watermark-client", round_num, client)
        return self.embed(state, examples, s.client_steps, seed, checked, rank, frozen)
