"""A client's data profile: the centroid of its prompts' representations under the frozen base model.

FedDPA (Yang et al. 2024, "Dual-Personalizing Adapter for Federated Foundation Models", Sec. 4.3) weighs the
global and the local adapter per test instance by how close the instance is to the client's own data. The
representation of a prompt is the mean over its (non-pad) prompt tokens of the base model's last hidden state,
with every adapter disabled, so that it does not move while the adapters train; a client's profile is the mean of
its training prompts' representations. Training (which writes ``clients/<name>/profile.safetensors``) and
inference (which compares a request with it) share this one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from fedlm.core.errors import FedlmError

CENTROID = "centroid"


def prompt_ids(example: Any) -> list[int]:
    """The prompt tokens of ``example``: a plain id sequence as it is; a tokenized conversation
    (``input_ids`` and ``labels``) up to its first supervised token (all of it when nothing is supervised)."""
    ids = getattr(example, "input_ids", None)
    if ids is None:
        return [int(t) for t in example]
    labels = getattr(example, "labels", None) or []
    first = next((i for i, label in enumerate(labels) if label != -100), len(ids))
    return list(ids[: max(first, 1)])


def _base_only(model: torch.nn.Module) -> AbstractContextManager[Any]:
    """Adapters disabled for a peft model; nothing to disable otherwise."""
    return model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()


@torch.no_grad()
def embed_prompts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Any],
    device: torch.device | str,
    batch_size: int = 8,
    max_length: int | None = None,
) -> torch.Tensor:
    """Mean-pooled last hidden state of the base model (adapters disabled) of each example's prompt, (N, H) float32.

    ``examples``: token id sequences, or tokenized conversations (their prompt part is used, see :func:`prompt_ids`);
    ``max_length`` keeps each prompt's last tokens."""
    prompts = [prompt_ids(ex) for ex in examples]
    if max_length is not None:
        prompts = [p[-max_length:] for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise FedlmError("a prompt with no tokens has no representation; drop empty prompts before computing a profile")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        with _base_only(model):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), int(pad), dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, p in enumerate(chunk):  # right padding: positions 0..n-1 are the prompt
                    ids[row, : len(p)] = torch.tensor(p)
                    mask[row, : len(p)] = 1
                ids, mask = ids.to(device), mask.to(device)
                hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]  # (B, T, H)
                weights = mask.unsqueeze(-1).to(torch.float32)  # (B, T, 1)
                pooled = (hidden.to(torch.float32) * weights).sum(1) / weights.sum(1)  # (B, H)
                out.append(pooled.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def compute_profile(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Any],
    device: torch.device | str,
    batch_size: int = 8,
    max_length: int | None = None,
) -> torch.Tensor:
    """A client's centroid, (H,) float32: the mean over ``examples`` of :func:`embed_prompts`."""
    if not examples:
        raise FedlmError("a client with no training examples has no profile")
    return embed_prompts(model, tokenizer, examples, device, batch_size, max_length).mean(0)


def save_profile(path: str | Path, centroid: torch.Tensor) -> None:
    """Write ``centroid`` as ``{"centroid": float32 (H,)}`` in a safetensors file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({CENTROID: centroid.detach().to(torch.float32).contiguous().cpu()}, str(path))


def load_profile(path: str | Path) -> torch.Tensor:
    """The centroid saved by :func:`save_profile`; a missing file or key is a FedlmError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FedlmError(f"client profile {str(path)!r} is missing; it is written by a run with a `personalization` method")
    tensors = load_file(str(path))
    if CENTROID not in tensors:
        raise FedlmError(f"client profile {str(path)!r} has no {CENTROID!r} tensor")
    return tensors[CENTROID]
