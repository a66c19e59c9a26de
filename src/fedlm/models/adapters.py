"""Parameter-efficient adapters through ``peft`` (or the full model), and moving their trainable tensors in and out.

``peft.method`` picks the adapter: ``lora``, ``dora``, ``ia3``, ``prompt_tuning``, ``prefix_tuning`` (a
``peft.PeftModel``) or ``full`` (no wrapper: every weight of the base model trains, :mod:`fedlm.models.full`).

The names of the trainable tensors are the keys of every client update. For the peft methods they are the names
``peft`` saves and loads (``get_peft_model_state_dict``): the parameter name with the adapter name removed
(``...q_proj.lora_A.weight``, ``...k_proj.ia3_l``), with peft's two renamings (DoRA's
``...lora_magnitude_vector``, and ``prompt_embeddings`` for the soft prompt of prompt and prefix tuning). For
``full`` they are the model's own parameter names (``model.layers.0.self_attn.q_proj.weight``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)
from peft import (
    PeftConfig as PeftMethodConfig,
)
from transformers import PreTrainedModel

from fedlm.config.schema import PeftConfig
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import seeded_torch
from fedlm.core.update import TensorDict
from fedlm.models.full import make_fully_trainable, save_full_model
from fedlm.models.residual import apply_residuals, has_residuals, save_with_residuals

PROMPT_METHODS = ("prompt_tuning", "prefix_tuning")


def peft_method_config(config: PeftConfig) -> PeftMethodConfig:
    """The ``peft`` config object of ``peft.method`` (every method but ``full``).

    LoRA: Hu et al. 2022 (W + (alpha/r) B A, B = 0 at init). DoRA: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank
    Adaptation" (W' = m (W + s B A) / ||W + s B A||_c, the magnitude m trainable). IA3: Liu et al. 2022, "Few-Shot
    Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning" (learned vectors l_k, l_v, l_ff
    rescale keys, values and the MLP's inner activations; ones at init, so the starting model is the base model).
    Prompt tuning: Lester et al. 2021 (soft-prompt embeddings, initialised from the embeddings of seeded random
    vocabulary tokens, their "sampled vocab" init). Prefix tuning: Li & Liang 2021 (trainable per-layer key/value
    prefixes, peft's default random init, no reparameterisation).
    """
    method = config.method
    if method in ("lora", "dora"):
        return LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,  # type: ignore[arg-type]  # peft annotates int; alpha / r is float math
            lora_dropout=config.dropout,
            target_modules=config.target_modules,
            task_type="CAUSAL_LM",
            use_dora=method == "dora",
        )
    virtual_tokens = config.num_virtual_tokens or 0  # set for the prompt methods (PeftConfig's validator)
    if method == "ia3":
        return IA3Config(target_modules=config.target_modules, feedforward_modules=config.feedforward_modules, task_type="CAUSAL_LM")
    if method == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=virtual_tokens, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB, task_type="CAUSAL_LM")
    if method == "prefix_tuning":
        return PrefixTuningConfig(num_virtual_tokens=virtual_tokens, task_type="CAUSAL_LM")
    raise FedlmError(f"`peft.method` {method!r} has no peft adapter; valid: lora, dora, ia3, prompt_tuning, prefix_tuning, full")


def attach_adapter(
    model: PreTrainedModel, config: PeftConfig, seed: int, freeze_lora_a: bool = False, layers: list[int] | None = None
) -> PeftModel | PreTrainedModel:
    """Wrap the frozen base model with the adapter of ``peft.method`` initialised from ``seed`` (global RNG left
    untouched); for ``full``, make every weight of ``model`` trainable (refused above a size limit) and return it.
    ``layers`` (lora, dora): adapt only these decoder layers (peft's ``layers_to_transform``; offsite-tuning's
    bottom and top layers).

    With ``freeze_lora_a`` (LoRA only) the A factors keep their seeded random init and only B trains (FFA-LoRA, Sun
    et al. 2024); every client derives the same A from the shared seed, so A never travels.
    """
    if config.method == "full":
        return make_fully_trainable(model)
    if freeze_lora_a and config.method != "lora":
        raise FedlmError(f"`aggregation.lora: ffa` needs `peft.method: lora`, got {config.method!r}")
    method_config = peft_method_config(config)
    if layers is not None:
        if not isinstance(method_config, LoraConfig):
            raise FedlmError(f"adapting only some layers needs `peft.method: lora` or `dora`, got {config.method!r}")
        method_config.layers_to_transform, method_config.layers_pattern = layers, "layers"
    with seeded_torch(seed):
        try:
            peft_model = get_peft_model(model, method_config)
        except ValueError as exc:
            if config.method in PROMPT_METHODS:
                raise FedlmError(f"`peft.method: {config.method}` does not fit this model: {exc}") from None
            raise FedlmError(f"`peft.target_modules` {config.target_modules!r} do not fit this model: {exc}") from None
    if freeze_lora_a:
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    if config.method == "prompt_tuning":
        peft_model.register_forward_hook(_drop_virtual_token_logits(config.num_virtual_tokens or 0), with_kwargs=True)
    return peft_model


def _drop_virtual_token_logits(num_virtual: int) -> Callable[..., Any]:
    """A forward hook that cuts the soft prompt's positions off the logits, so they line up with ``input_ids``.

    peft's prompt tuning prepends ``num_virtual`` embeddings and returns logits of shape (B, n + T, V) (its own loss
    pads the labels to match); every other method, and every loss fedlm computes from logits, expects (B, T, V).
    Generation does not go through this forward (peft calls the base model's ``generate``), so it is unaffected.
    """

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = getattr(output, "logits", None)
        if ids is not None and logits is not None and logits.shape[1] == ids.shape[1] + num_virtual:
            output.logits = logits[:, num_virtual:]  # (B, T, V)
        return output

    return hook


def named_trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters (live, not copies), by update name (peft's saved name, or the model's own for full)."""
    if isinstance(model, PeftModel):
        return {state_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def trainable_state(model: torch.nn.Module) -> TensorDict:
    """A detached copy of the trainable tensors, by update name.

    For the peft methods this equals ``get_peft_model_state_dict(model)`` restricted to the trainable tensors, in
    the same order (a test holds it to that).
    """
    return {name: param.detach().clone() for name, param in named_trainable_parameters(model).items()}


def load_trainable_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable tensors in place (names as returned by :func:`trainable_state`);
    the frozen LoRA residuals of ``state`` (FedEx-LoRA, FLoRA: :mod:`fedlm.models.residual`) are applied, and a
    residual the model had but ``state`` lacks is removed."""
    if isinstance(model, PeftModel):
        apply_residuals(model, state)
    by_name = named_trainable_parameters(model)
    missing = set(by_name) - set(state)
    if missing:
        raise KeyError(f"adapter state lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        for name, param in by_name.items():
            param.copy_(state[name].to(param.dtype))


def save_adapter(model: torch.nn.Module, state: Mapping[str, torch.Tensor], out_dir: Path) -> None:
    """Save ``state``: a peft adapter folder (``PeftModel.from_pretrained(base, out_dir)``), or for ``full`` the whole
    model as a Hugging Face folder (``AutoModelForCausalLM.from_pretrained(out_dir)``).

    Saved in float32 whatever ``model.dtype`` the run computed in: peft holds every method's adapter weights in
    float32 over a bfloat16 base (its ``autocast_adapter_dtype``), and reloads them so; a full model is upcast for
    the save (:func:`fedlm.models.full.save_full_model`). A reload onto a base in the run's dtype computes exactly
    what the trained model did. A state with LoRA residuals (``aggregation.lora: fedex | flora``) is saved as a LoRA
    of larger rank per module that carries the residual (:func:`fedlm.models.residual.save_with_residuals`).
    """
    load_trainable_state(model, state)
    if isinstance(model, PeftModel) and has_residuals(state):
        save_with_residuals(model, state, out_dir)  # the residuals saved as extra LoRA rank, loadable by peft
    elif isinstance(model, PeftModel):
        model.save_pretrained(str(out_dir))
    elif isinstance(model, PreTrainedModel):
        save_full_model(model, out_dir)
    else:
        raise TypeError(f"save_adapter needs a PeftModel or a PreTrainedModel, got {type(model).__name__}")


def state_name(param_name: str) -> str:
    """A peft parameter name -> the name peft saves it under (``get_peft_model_state_dict``):

    ``base_model.model.x.lora_A.default.weight`` -> ``base_model.model.x.lora_A.weight``;
    ``...lora_magnitude_vector.default.weight`` -> ``...lora_magnitude_vector`` (DoRA);
    ``prompt_encoder.default.embedding.weight`` -> ``prompt_embeddings`` (prompt and prefix tuning).
    """
    if param_name.startswith("prompt_encoder.") and param_name.endswith(".embedding.weight"):
        return "prompt_embeddings"
    name = param_name.replace(".default.", ".").replace(".default", "")
    if name.endswith(".lora_magnitude_vector.weight"):
        return name.removesuffix(".weight")
    return name


def peft_summary(config: PeftConfig) -> str:
    """One line on the adapter with only the fields that apply to its method (for the report)."""
    method = config.method
    if method in ("lora", "dora"):
        return f"{method} r={config.r} alpha={config.alpha} targets={config.target_modules}"
    if method == "ia3":
        return f"ia3 targets={config.target_modules} feedforward={config.feedforward_modules}"
    if method in PROMPT_METHODS:
        return f"{method} virtual_tokens={config.num_virtual_tokens}"
    return "full (every weight trainable)"
