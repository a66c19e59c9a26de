"""The ``model`` and ``peft`` sections: which base model to load, and the parameter-efficient method on it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, StrictInt, field_validator, model_validator

from fedlm.config.schema.section import Section


class ModelConfig(Section):
    """Which base model to load and how.

    ``name`` is an alias (``smollm2-135m-instruct``, ``tiny-random-llama``), a local directory, a ``.gguf`` file
    or a Hugging Face hub id. ``device``, ``quantization``, ``attn_implementation`` and ``gradient_checkpointing``
    are checked against this machine at load (:mod:`fedlm.models.hardware`).
    """

    name: str = "smollm2-135m-instruct"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="auto (the GPU when one is visible, else the CPU), cpu, cuda or cuda:N",
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none",
        description="store the frozen base in 4-bit NF4 with double quantization (QLoRA) or 8-bit (bitsandbytes), "
        "computed in `model.dtype`; adapters and updates stay float32; not with `peft.method: full`",
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, ~30% more compute per step")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="the attention kernel; flash_attention_2 needs a CUDA GPU and the flash-attn package"
    )
    revision: str | None = None
    init_adapter: str | None = Field(
        None,
        description="start the global adapter from an earlier run's `adapter/` folder (or any peft adapter folder); "
        "it must have been trained with the same `model.name` and the same `peft` method and shapes",
    )


PeftMethod = Literal["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "full"]
#: IA3 on Llama-style models (peft's own default for Llama): keys, values and the MLP's down projection.
IA3_TARGET_MODULES = ["k_proj", "v_proj", "down_proj"]
IA3_FEEDFORWARD_MODULES = ["down_proj"]
DEFAULT_NUM_VIRTUAL_TOKENS = 20


class PeftConfig(Section):
    """The parameter-efficient method. Only the trainable tensors of this adapter ever leave a client.

    ``method``: ``lora`` (Hu et al. 2022), ``dora`` (LoRA with a trainable magnitude vector, Liu et al. 2024),
    ``ia3`` (learned scaling vectors, Liu et al. 2022), ``prompt_tuning`` (trainable soft-prompt embeddings,
    Lester et al. 2021; random seeded init), ``prefix_tuning`` (trainable per-layer key/value prefixes, Li & Liang
    2021), all through ``peft``; or ``full`` (every base weight trainable, small models only). Fields that do not
    apply to the method are ignored (and left out of the report): ``r``, ``alpha``, ``dropout`` apply to lora/dora;
    ``target_modules`` to lora/dora/ia3; ``feedforward_modules`` to ia3; ``num_virtual_tokens`` to the two prompt
    methods; ``client_ranks`` to lora only.
    """

    method: PeftMethod = "lora"
    r: int = Field(8, ge=1, description="LoRA rank (lora, dora)")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator, scale = alpha / r (lora, dora)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input (lora, dora)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="modules adapted (lora, dora, ia3); for ia3 the default is k_proj, v_proj, down_proj",
    )
    feedforward_modules: list[str] | None = Field(None, description="ia3: the target modules whose input (not output) is scaled; default down_proj")
    num_virtual_tokens: int | None = Field(None, ge=1, description=f"prompt_tuning, prefix_tuning: soft tokens; default {DEFAULT_NUM_VIRTUAL_TOKENS}")
    client_ranks: list[StrictInt] | dict[str, StrictInt] | None = Field(
        None,
        description="per-client LoRA rank <= r: a list in client order or a mapping client name -> rank (lora only)",
    )

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        """Fill the defaults that depend on the method, so that the resolved config shows what runs."""
        if not isinstance(data, dict):
            return data
        method = data.get("method")
        data = {k: v for k, v in data.items() if v is not None or k not in ("feedforward_modules", "num_virtual_tokens")}
        if method == "ia3":
            data.setdefault("target_modules", list(IA3_TARGET_MODULES))
            targets = data["target_modules"]
            data.setdefault("feedforward_modules", [m for m in IA3_FEEDFORWARD_MODULES if targets == "all-linear" or m in targets])
        elif method in ("prompt_tuning", "prefix_tuning"):
            data.setdefault("num_virtual_tokens", DEFAULT_NUM_VIRTUAL_TOKENS)
        return data

    @field_validator("client_ranks", mode="before")
    @classmethod
    def _ranks_are_integers(cls, value: Any) -> Any:
        values = list(value.values()) if isinstance(value, dict) else value
        if value is not None and (not isinstance(values, list) or not all(type(v) is int for v in values)):
            raise ValueError("must be a list of integers (one per client) or a mapping client name -> integer")
        return value

    @model_validator(mode="after")
    def _ranks_within_r(self) -> PeftConfig:
        ranks = self.client_ranks
        if ranks is not None and self.method != "lora":
            raise ValueError(
                f"`peft.client_ranks` needs `peft.method: lora`, got {self.method!r}: heterogeneous ranks cut LoRA "
                "factors B A to a client's rank, which has no meaning for other methods; remove `peft.client_ranks`"
            )
        values = list(ranks.values()) if isinstance(ranks, dict) else (ranks or [])
        bad = [v for v in values if not 1 <= v <= self.r]
        if bad:
            raise ValueError(f"`peft.client_ranks` must lie in 1..`peft.r` ({self.r}), got {bad[0]}")
        return self

    @model_validator(mode="after")
    def _method_fields(self) -> PeftConfig:
        if self.method == "ia3" and self.target_modules != "all-linear":
            extra = [m for m in self.feedforward_modules or [] if m not in self.target_modules]
            if extra:
                raise ValueError(
                    f"`peft.feedforward_modules` must be a subset of `peft.target_modules` {self.target_modules}, "
                    f"got {extra}; add them to `peft.target_modules` or remove them"
                )
        return self
