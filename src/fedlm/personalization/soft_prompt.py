"""A soft prompt in front of every input of the shared model, and its export as a peft prompt-tuning adapter.

Inside :func:`soft_prompt` every forward of the model gets ``n`` trainable embeddings before its token embeddings
(``inputs_embeds = [P; E(input_ids)]``, the attention mask and the labels extended with ones and ignored targets)
and its logits cut back to the input's length (a ``logits_to_keep`` tensor of input positions is shifted by ``n``): what peft's prompt tuning (Lester et al. 2021) computes, so the
prompt saved by :func:`save_prompt_adapter` reproduces it when loaded with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PromptTuningConfig
from safetensors.torch import save_file

from fedlm.core.seeding import torch_generator

IGNORE_INDEX = -100


def initial_prompt(model: torch.nn.Module, num_virtual_tokens: int, seed: int) -> torch.Tensor:
    """(n, H) float32: the embeddings of ``n`` vocabulary tokens drawn with ``seed`` (Lester et al.'s "sampled vocab")."""
    embeddings = model.get_input_embeddings().weight  # type: ignore[operator]  # (V, H)
    ids = torch.randint(0, embeddings.shape[0], (num_virtual_tokens,), generator=torch_generator(seed))
    return embeddings.detach()[ids].to(torch.float32).cpu().clone()


@contextmanager
def soft_prompt(model: torch.nn.Module, prompt: torch.Tensor) -> Iterator[None]:
    """Prepend ``prompt`` (n, H; a leaf that may require grad) to every forward of ``model`` while inside."""
    n = prompt.shape[0]
    embed = model.get_input_embeddings()  # type: ignore[operator]

    def before(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        ids = kwargs.pop("input_ids", None)
        if ids is None and args:
            ids, args = args[0], args[1:]
        tokens = embed(ids)  # (B, T, H)
        virtual = prompt.to(device=tokens.device, dtype=tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B, n, H)
        kwargs["inputs_embeds"] = torch.cat([virtual, tokens], dim=1)  # (B, n + T, H)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        labels = kwargs.get("labels")
        if labels is not None:
            kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), IGNORE_INDEX), labels], dim=1)
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor):  # positions of the input ids: n later in the prompted sequence
            kwargs["logits_to_keep"] = keep + n
        return args, kwargs

    def after(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        logits = getattr(output, "logits", None)
        if logits is not None and not isinstance(kwargs.get("logits_to_keep"), torch.Tensor):  # kept ones are the asked ones
            output.logits = logits[:, n:]  # (B, T, V): aligned with the input ids again
        return output

    handles = [model.register_forward_pre_hook(before, with_kwargs=True), model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def save_prompt_adapter(prompt: torch.Tensor, model_config: Any, base_name: str | None, out_dir: Path) -> None:
    """``prompt`` as a peft prompt-tuning adapter folder (``adapter_config.json`` and ``prompt_embeddings``)."""
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=prompt.shape[0],
        token_dim=prompt.shape[1],
        num_transformer_submodules=1,
        num_attention_heads=model_config.num_attention_heads,
        num_layers=model_config.num_hidden_layers,
        base_model_name_or_path=base_name,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file({"prompt_embeddings": prompt.detach().to(torch.float32).contiguous().cpu()}, str(out_dir / "adapter_model.safetensors"))
