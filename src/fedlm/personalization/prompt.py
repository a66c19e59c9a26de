"""``prompt``: a shared LoRA and a personal soft prompt per client (pFedPT-style: Li et al. 2023, "Visual Prompt
Based Personalized Federated Learning", here with a language model's soft prompt, Lester et al. 2021).

Every time a client is sampled it first trains its own prompt P_c (``num_virtual_tokens`` embeddings before every
input) on its data with the received adapter frozen, then trains the shared adapter with P_c fixed in front of its
inputs (pFedPT's two local stages); only the adapter is uploaded and aggregated, P_c stays with the client. The
personal model is the final global adapter with P_c in front: ``clients/<name>/adapter/`` (the LoRA) and
``clients/<name>/prompt/`` (a peft prompt-tuning adapter), loaded as ``PeftModel.from_pretrained(
PeftModel.from_pretrained(base, adapter).merge_and_unload(), prompt)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

from fedlm.core.errors import FedlmError
from fedlm.core.sampling import batch_indices
from fedlm.core.seeding import derive_seed, seeded_torch
from fedlm.core.task import ClientTask, LocalPlan
from fedlm.core.update import TensorDict
from fedlm.models.adapters import load_trainable_state
from fedlm.personalization.base import PERSONALIZATION, PersonalMethod
from fedlm.personalization.soft_prompt import initial_prompt, save_prompt_adapter, soft_prompt

PROMPT = "prompt"


@PERSONALIZATION.register("prompt")
class PersonalPrompt(PersonalMethod):
    """A shared LoRA and a personal soft prompt."""

    name = "prompt"
    combine = "prompt"

    def prompt_of(self, client: str, before: int | None = None) -> torch.Tensor:
        """The client's last prompt (the seeded initial one before its first round; the same for every client)."""
        kept = self.side.store.latest(client, before)
        if kept is not None:
            return kept[PROMPT]
        seed = derive_seed(self.side.config.seed, "soft-prompt-init") % 2**31
        return initial_prompt(self.side.trainer.model, self.params.num_virtual_tokens, seed)

    @contextmanager
    def around(self, client: str, task: ClientTask) -> Iterator[None]:
        """Stage 1: train the prompt with the received adapter frozen; stage 2 (inside): the adapter trains with it."""
        plan = self.side.plan(client, task.plan.round, "prompt", self.params.local_steps, self.params.lr, task.plan.rank)
        load_trainable_state(self.side.trainer.model, task.state)
        prompt = self.train_prompt(client, self.prompt_of(client, task.plan.round), plan)
        self.side.store.save(client, task.plan.round, {PROMPT: prompt})
        with soft_prompt(self.side.trainer.model, prompt):
            yield

    def train_prompt(self, client: str, start: torch.Tensor, plan: LocalPlan) -> torch.Tensor:
        """``len(plan.lrs)`` AdamW steps on the prompt alone (the model's own parameters frozen meanwhile)."""
        trainer, examples = self.side.trainer, self.side.client_train[client]
        model = trainer.model
        prompt = start.clone().to(torch.float32).requires_grad_(True)
        if not plan.lrs:
            return prompt.detach()
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        optimizer = torch.optim.AdamW([prompt], lr=plan.lrs[0], weight_decay=0.0)
        model.train()
        try:
            with seeded_torch(plan.seed), soft_prompt(model, prompt):
                for lr, ids in zip(plan.lrs, batch_indices(len(examples), len(plan.lrs), plan.batch_size, plan.seed)):
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    batch = {k: v.to(trainer.device) for k, v in trainer.objective.collate([examples[i] for i in ids], trainer.pad_id).items()}
                    optimizer.zero_grad(set_to_none=True)
                    loss = trainer.objective.loss(model, batch)[0]
                    if not torch.isfinite(loss):
                        raise FedlmError(f"client {client!r}: non-finite loss while training its soft prompt; lower `personalization.lr`")
                    loss.backward()
                    if trainer.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_([prompt], trainer.max_grad_norm)
                    optimizer.step()
        finally:
            for name, p in model.named_parameters():
                p.requires_grad_(flags[name])
            model.eval()
        return prompt.detach().clone()

    def personal_state(self, client: str, global_state: TensorDict) -> TensorDict:
        """The shared adapter itself: the personal part is the prompt (:meth:`personal_context`)."""
        return dict(global_state)

    def personal_context(self, client: str) -> AbstractContextManager[Any]:
        return soft_prompt(self.side.trainer.model, self.prompt_of(client))

    def export(self, client: str, folder: Path) -> None:
        model = self.side.trainer.model
        base_config = model.config if hasattr(model, "config") else None
        save_prompt_adapter(self.prompt_of(client), base_config, self.side.config.model.name, folder / "prompt")

    def describe(self) -> dict[str, object]:
        return {
            "num_virtual_tokens": self.params.num_virtual_tokens,
            "prompt_adapter": "prompt",
            "load": "PeftModel.from_pretrained(PeftModel.from_pretrained(base, 'adapter').merge_and_unload(), 'prompt')",
        }
