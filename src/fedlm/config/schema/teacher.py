"""The ``teacher`` section: learning from a black-box teacher, any OpenAI-compatible endpoint (:mod:`fedlm.teacher`).

``mode: label``: each client sends its own prompts (never its answers) to the teacher and trains on the teacher's
answers mixed with its own labels. ``mode: synthetic`` (FDKT-style): each client trains a small generator on its own
data with DP-SGD and only the generator's synthetic prompts go to the teacher.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedlm.config.schema.section import Section


class SyntheticConfig(Section):
    """``teacher.mode: synthetic``: the client's prompt generator (a LoRA adapter on ``generator``, trained with
    DP-SGD on the client's prompts; Abadi et al. 2016) and the filter of prompts that copy a training record."""

    generator: str | None = Field(None, description="base model of the generator (default: `model.name`)")
    num_prompts: int = Field(32, ge=1, description="synthetic prompts sampled per client")
    max_prompt_tokens: int = Field(48, ge=4, description="tokens per prompt, when training and sampling the generator")
    steps: int = Field(20, ge=1, description="DP-SGD steps of the generator")
    batch_size: int = Field(8, ge=1, description="expected Poisson lot size of the generator's DP-SGD")
    lr: float = Field(0.003, gt=0.0, description="the generator's AdamW learning rate")
    r: int = Field(8, ge=1, description="LoRA rank of the generator")
    noise_multiplier: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="sigma of the generator's DP-SGD")
    target_epsilon: float | None = Field(None, gt=0.0, allow_inf_nan=False, description="choose sigma per client for this epsilon")
    max_grad_norm: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="per-example gradient L2 bound")
    temperature: float = Field(1.0, gt=0.0, le=2.0, description="sampling temperature of the generator")
    max_overlap: int = Field(8, ge=1, description="a prompt sharing more than this many consecutive tokens with a record is dropped")

    @model_validator(mode="after")
    def _one_noise_source(self) -> SyntheticConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of `teacher.synthetic.noise_multiplier` or `teacher.synthetic.target_epsilon`")
        return self


class TeacherConfig(Section):
    """A black-box teacher behind an OpenAI-compatible ``/v1/chat/completions``, called with bounded concurrency,
    retries with exponential backoff, a timeout, and an on-disk cache of its answers."""

    mode: Literal["label", "synthetic"] | None = Field(None, description="label | synthetic; None: no teacher")
    base_url: str | None = Field(None, description="the endpoint, e.g. http://127.0.0.1:8000/v1")
    model: str | None = Field(None, description="the teacher's model id at the endpoint")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (None: no key)")
    mix: float = Field(0.5, gt=0.0, le=1.0, description="weight of the teacher's loss; the client's own labels get 1 - mix")
    logprobs: int = Field(5, ge=0, le=20, description="top-k log-probabilities asked per token (0: sequence-level KD only)")
    max_tokens: int = Field(128, ge=1, description="longest teacher answer, in the teacher's tokens")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="the teacher's sampling temperature (0: greedy)")
    concurrency: int = Field(4, ge=1, description="requests in flight per client at most")
    retries: int = Field(3, ge=0, description="retries of a failed or timed-out request (then the client's round fails)")
    backoff_s: float = Field(0.5, ge=0.0, description="wait before the first retry; doubled each retry")
    timeout_s: float = Field(60.0, gt=0.0, description="seconds per request")
    cache_dir: str | None = Field(None, description="on-disk answer cache (default: RUN_DIR/teacher/cache)")
    synthetic: SyntheticConfig | None = Field(None, description="settings of `mode: synthetic`")

    @model_validator(mode="after")
    def _complete(self) -> TeacherConfig:
        if self.mode is None:
            return self
        missing = [name for name in ("base_url", "model") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"`teacher.mode: {self.mode}` needs {' and '.join(f'`teacher.{m}`' for m in missing)}")
        if self.mode == "synthetic" and self.synthetic is None:
            raise ValueError("`teacher.mode: synthetic` needs `teacher.synthetic` with `noise_multiplier` or `target_epsilon`")
        if self.mode == "label" and self.synthetic is not None:
            raise ValueError("`teacher.synthetic` applies to `teacher.mode: synthetic` only; remove it or set the mode")
        return self
