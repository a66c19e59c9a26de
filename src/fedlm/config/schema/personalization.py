"""The ``personalization`` section: each client's own model beside the global one (the method's parameters sit
beside ``method`` and are checked here, by the method's own parameter model)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedlm.config.schema.section import Section


class _LocalTraining(Section):
    """How a client trains its personal part: steps (default ``federation.local_steps``) and a constant lr (default
    ``federation.lr``)."""

    local_steps: int | None = Field(None, ge=0, description="personal optimizer steps (default: federation.local_steps)")
    lr: float | None = Field(None, gt=0.0, description="personal learning rate, constant (default: federation.lr)")


class FinetuneParams(_LocalTraining):
    """``finetune``: after the last round each client fine-tunes the global adapter on its own data."""


class FedSAParams(Section):
    """``fedsa`` (FedSA-LoRA) has no parameters: A is shared, B stays with the client."""


class DittoParams(_LocalTraining):
    """``ditto``: the personal adapter's proximal weight towards the global one."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    lam: float = Field(0.1, ge=0.0, alias="lambda", description="lambda of Ditto's proximal term lambda/2 ||v - w||^2")


class DualParams(_LocalTraining):
    """``dual`` (FedDPA): the global adapter's weight when both adapters are combined for evaluation."""

    weight: float = Field(0.5, ge=0.0, le=1.0, description="global adapter's weight alpha; the local one gets 1 - alpha")


class PromptParams(_LocalTraining):
    """``prompt``: a personal soft prompt of ``num_virtual_tokens`` embeddings in front of every input."""

    num_virtual_tokens: int = Field(8, ge=1, le=256)


METHOD_PARAMS: dict[str, type[Section]] = {
    "finetune": FinetuneParams,
    "fedsa": FedSAParams,
    "dual": DualParams,
    "ditto": DittoParams,
    "prompt": PromptParams,
}


class PersonalizationConfig(BaseModel):
    """Personal models: ``method`` by name (finetune | fedsa | dual | ditto | prompt) with its parameters beside it;
    ``evaluate``: after the run, score the global and each client's personal model on every client's test share."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: str | None = Field(None, description="finetune | fedsa | dual | ditto | prompt")
    evaluate: bool = Field(True, description="per-client global vs personal evaluation after the run")

    def params(self) -> dict[str, Any]:
        """The method's raw parameters: every key but ``method`` and ``evaluate``."""
        return dict(self.model_extra or {})

    def method_params(self) -> Any:
        """The method's parameters, validated (None without a method)."""
        if self.method is None:
            return None
        return METHOD_PARAMS[self.method].model_validate(self.params())

    @model_validator(mode="after")
    def _check(self) -> PersonalizationConfig:
        if self.method is None:
            if self.model_extra:
                raise ValueError(f"`personalization.method` is required when parameters are set ({', '.join(self.model_extra)})")
            return self
        if self.method not in METHOD_PARAMS:
            raise ValueError(f"`personalization.method` {self.method!r} is unknown; valid: {', '.join(sorted(METHOD_PARAMS))}")
        try:
            self.method_params()
        except ValidationError as exc:
            problems = "; ".join(f"`personalization.{'.'.join(str(p) for p in e['loc'])}`: {e['msg']}" for e in exc.errors())
            raise ValueError(f"personalization method {self.method!r}: {problems}") from None
        return self
