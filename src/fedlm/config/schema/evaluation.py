"""The ``eval`` section and its privacy ``audit``: when and how the global model is evaluated."""

from __future__ import annotations

from pydantic import Field

from fedlm.config.schema.section import Section


class AuditConfig(Section):
    """The privacy audit run after training (``fedlm audit``): membership inference on the global model (and a client's
    local model), and canaries (Carlini et al. 2019, "The Secret Sharer"): random secrets planted in one client's
    training data, their exposure in bits ranked among ``canary_references`` never-planted secrets of the same format."""

    canaries: int = Field(0, ge=0, le=1000, description="how many random secrets to plant (0: none)")
    canary_client: str | None = Field(None, description="whose training data gets them; default the first client")
    canary_repetitions: int = Field(4, ge=1, le=1000, description="copies of each canary in that client's data")
    canary_references: int = Field(1000, ge=1, le=100_000, description="random candidate secrets a canary is ranked among")
    client_model: bool = Field(False, description="also save and audit the canary client's local model")
    max_examples: int = Field(200, ge=2, description="members and non-members each in the membership inference")


class HarnessConfig(Section):
    """Standard benchmarks (EleutherAI lm-evaluation-harness) on the global model during training: benchmark accuracy
    per round in ``metrics.jsonl`` (``split: harness``), the report and its plots (as ``fedlm eval`` after it)."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task names, e.g. [wordnet_mc, arc_easy]")
    every: int = Field(1, ge=0, description="every N rounds (0: only after the last round); round 0 with `eval.at_start`")
    limit: int | None = Field(None, ge=1, description="only the first N documents of each task")
    include_path: list[str] = Field(default_factory=list, description="folders of your own lm-eval task YAMLs + local data")
    batch_size: int = Field(8, ge=1)
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (default: each task's own)")
    allow_code_execution: bool = Field(False, description="let code tasks (humaneval, mbpp) run the model's generated code on this machine")


class EvalConfig(Section):
    """When and how the global model is evaluated."""

    every: int = Field(1, ge=0, description="evaluate every N rounds (0: only the last round)")
    at_start: bool = Field(True, description="evaluate the starting model as round 0")
    generate: bool = True
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1)
    max_examples: int | None = Field(None, ge=1, description="seeded subsample of the test set")
    audit: AuditConfig | None = Field(None, description="privacy audit at the end of the run (`fedlm audit`)")
    harness: HarnessConfig | None = Field(None, description="lm-evaluation-harness tasks on the global model during training")
