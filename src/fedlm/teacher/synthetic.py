"""``teacher.mode: synthetic``: only DP-synthesised prompts leave a client (FDKT, Li et al. 2024, "Federated
Domain-Specific Knowledge Transfer on Large Language Models Using Synthetic Data").

Each client trains a small generator (a fresh LoRA adapter on ``teacher.synthetic.generator``, default the run's
base model) on its own prompts with DP-SGD (Abadi et al. 2016, fedlm's :mod:`fedlm.privacy.sample_dp`: Poisson
lots, per-example clipping, Gaussian noise, RDP/PLD accounting), samples ``num_prompts`` prompts from it, and sends
only those. By post-processing, everything derived from the prompts (the teacher's answers, the student's update)
costs the client no more than the generator's epsilon at ``privacy.delta``, which is logged.

DP bounds what a prompt reveals on average, not that a sample never copies a record; so a sample that shares more
than ``max_overlap`` consecutive tokens with any of the client's records (prompt and answer) is dropped and counted.
"Longest common substring longer than m" equals "an (m+1)-gram in common", so the filter is a set lookup of the
records' (m+1)-grams.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.config.schema import ExperimentConfig, PeftConfig
from fedlm.config.schema.teacher import SyntheticConfig
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed, seeded_torch
from fedlm.core.task import LocalPlan
from fedlm.data.formats import Message
from fedlm.data.tokenize import IGNORE_INDEX, TokenizedExample
from fedlm.federation.trainer import ClientTrainer
from fedlm.models.adapters import attach_adapter, load_trainable_state, trainable_state
from fedlm.models.loading import LoadedModel, load_base_model
from fedlm.objectives import build_objective
from fedlm.privacy.accounting import solve_noise_multiplier
from fedlm.privacy.sample_dp import SampleDP, sampling_rate


class VerbatimFilter:
    """Whether a text shares more than ``max_overlap`` consecutive tokens with one of ``texts``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_overlap: int) -> None:
        self.tokenizer = tokenizer
        self.n = max_overlap + 1
        self.grams = {gram for text in texts for gram in ngrams(self._ids(text), self.n)}

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def copies(self, text: str) -> bool:
        """True when ``text`` reproduces more than ``max_overlap`` tokens of a record verbatim."""
        return any(gram in self.grams for gram in ngrams(self._ids(text), self.n))


def ngrams(ids: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """The ``n``-grams of ``ids`` (none when shorter)."""
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


@dataclass(frozen=True)
class SyntheticPrompts:
    """A client's synthetic prompts and what they cost: the generator's epsilon at ``delta`` and its sigma."""

    prompts: list[str]
    epsilon: float
    delta: float
    noise_multiplier: float
    generated: int
    filtered: int  # dropped by the verbatim filter
    empty: int  # dropped: no text

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> SyntheticPrompts:
        return cls(**json.loads(path.read_text()))


def prompt_messages(text: str, system_prompt: str | None) -> list[Message]:
    """A synthetic prompt as the conversation sent to the teacher (the run's system prompt first, if any)."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": text}]


class PromptGenerator:
    """The generator model, loaded once per run; each client trains its own adapter from the same start."""

    def __init__(self, config: ExperimentConfig, settings: SyntheticConfig) -> None:
        name = settings.generator or config.model.name
        model_config = config.model.model_copy(
            update={"name": name, "init_adapter": None, "revision": None if settings.generator else config.model.revision}
        )
        self.loaded: LoadedModel = load_base_model(model_config, seed=derive_seed(config.seed, "teacher-generator-base") % 2**31)
        peft = PeftConfig(r=settings.r, alpha=2.0 * settings.r, dropout=0.0)
        self.model = attach_adapter(self.loaded.model, peft, seed=derive_seed(config.seed, "teacher-generator-adapter") % 2**31)
        self.initial = trainable_state(self.model)
        self.settings = settings
        self.config = config
        tok = self.loaded.tokenizer
        self.start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.end = tok.eos_token_id

    def examples(self, prompts: Sequence[str]) -> list[TokenizedExample]:
        """Each prompt as a plain language-modelling example: start token, text (cut), end token."""
        out = []
        for text in prompts:
            ids = list(self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])[: self.settings.max_prompt_tokens]
            seq = [self.start, *ids, self.end]
            out.append(TokenizedExample(seq, [IGNORE_INDEX, *seq[1:]]))
        return out

    def synthesize(self, client: str, prompts: Sequence[str], guard: VerbatimFilter) -> SyntheticPrompts:
        """Train the client's generator with DP-SGD on ``prompts``, sample, filter; the prompts and their epsilon."""
        s, privacy = self.settings, self.config.privacy
        examples = self.examples(prompts)
        sigma = solve_noise_multiplier(
            "teacher.synthetic",
            s.noise_multiplier,
            s.target_epsilon,
            sampling_rate(s.batch_size, len(examples)),
            s.steps,
            privacy.delta,
            privacy.accountant,
        )
        dp = SampleDP(sigma, s.max_grad_norm, privacy.delta, privacy.accountant)
        tok = self.loaded.tokenizer
        trainer = ClientTrainer(self.model, tok.pad_token_id, self.loaded.device, 0.0, None, [], "adamw", dp, build_objective("sft"))
        plan = LocalPlan(round=1, lrs=[s.lr] * s.steps, batch_size=s.batch_size, seed=derive_seed(self.config.seed, "teacher-generator", client))
        update = trainer.train(client, examples, self.initial, plan)
        load_trainable_state(self.model, {k: self.initial[k] + update.tensors[k].to(self.initial[k].dtype) for k in self.initial})
        texts = self._sample(derive_seed(self.config.seed, "teacher-generator-sample", client) % 2**31)
        empty = sum(1 for t in texts if not t)
        kept = [t for t in texts if t and not guard.copies(t)]
        return SyntheticPrompts(kept, update.metrics["sample_epsilon"], privacy.delta, sigma, len(texts), len(texts) - empty - len(kept), empty)

    def _sample(self, seed: int) -> list[str]:
        """``num_prompts`` samples from the start token (seeded), decoded without special tokens and stripped."""
        s, tok = self.settings, self.loaded.tokenizer
        start = torch.full((s.num_prompts, 1), self.start, dtype=torch.long, device=self.loaded.device)
        self.model.eval()
        with torch.no_grad(), seeded_torch(seed):
            out = self.model.generate(  # type: ignore[operator]  # PeftModel forwards it to the causal LM
                input_ids=start,
                attention_mask=torch.ones_like(start),
                do_sample=True,
                temperature=s.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=s.max_prompt_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=self.end,
            )
        return [text.strip() for text in tok.batch_decode(out[:, 1:], skip_special_tokens=True)]


def make_synthetic_prompts(generator: PromptGenerator, client: str, prompts: Sequence[str], texts: Sequence[str], path: Path) -> SyntheticPrompts:
    """The client's synthetic prompts from its ``prompts``, filtered against its records' ``texts``, saved to
    ``path`` (later rounds and a resumed run read them: the epsilon is spent once). None left fails the client."""
    guard = VerbatimFilter(generator.loaded.tokenizer, texts, generator.settings.max_overlap)
    made = generator.synthesize(client, prompts, guard)
    made.save(path)
    if not made.prompts:
        raise FedlmError(
            f"client {client!r}: none of its {made.generated} synthetic prompts is usable ({made.filtered} copied a record, "
            f"{made.empty} empty); raise `teacher.synthetic.num_prompts` or `teacher.synthetic.max_overlap`"
        )
    return made
