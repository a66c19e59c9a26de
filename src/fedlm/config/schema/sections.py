"""The experiment config: one typed, validated pydantic model per YAML section.

Unknown keys and bad values are refused at load time with a message that names the field and the fix
(see :mod:`fedlm.config.io` for YAML loading, ``--set`` overrides and error formatting).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from fedlm.config.schema.privacy import PrivacyConfig
from fedlm.config.schema.section import Section


class ModelConfig(Section):
    """Which base model to load and how.

    ``name`` is an alias (``smollm2-135m-instruct``, ``tiny-random-llama``), a local directory, a ``.gguf`` file
    or a Hugging Face hub id.
    """

    name: str = "smollm2-135m-instruct"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
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
    feedforward_modules: list[str] | None = Field(
        None, description="ia3: the target modules whose input (not output) is scaled; default down_proj"
    )
    num_virtual_tokens: int | None = Field(
        None, ge=1, description=f"prompt_tuning, prefix_tuning: soft tokens; default {DEFAULT_NUM_VIRTUAL_TOKENS}"
    )
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


class DataConfig(Section):
    """Where the examples come from and how they become token sequences."""

    train: str = Field("embedded:wordnet_defs", description="file, folder, or embedded:<name>")
    test: str | None = Field(None, description="held-out file; without it a seeded split of `train`")
    format: Literal["auto", "alpaca", "messages"] = "auto"
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_length: int = Field(256, ge=8, description="tokens per example; longer ones are cut from the right")
    max_train_examples: int | None = Field(None, ge=1)
    system_prompt: str | None = Field(None, description="system message put before every conversation")


class PartitionConfig(Section):
    """How the training (and test) examples are split among clients; ``node_local``: they are not split, each client's
    SuperNode reads its own ``data.train`` (Flower runtime) and the server holds only ``data.test``."""

    method: Literal["iid", "dirichlet", "by_field", "quantity", "node_local"] = "by_field"
    num_clients: int | None = Field(None, ge=1, description="required for iid, dirichlet and quantity")
    clients: list[str] | None = Field(
        None, description="node_local: the federation's client names (a SuperNode's partition-id K serves clients[K])"
    )
    field: str | None = "domain"
    alpha: float = Field(0.5, gt=0.0)
    min_examples: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _needs(self) -> PartitionConfig:
        if self.method == "node_local":
            if not self.clients:
                raise ValueError("`partition.clients` is required for `partition.method: node_local`: the federation's client names")
            repeated = sorted({c for c in self.clients if self.clients.count(c) > 1})
            if repeated:
                raise ValueError(f"`partition.clients` names {', '.join(repeated)} more than once")
            if self.num_clients is not None and self.num_clients != len(self.clients):
                raise ValueError(f"`partition.num_clients` ({self.num_clients}) differs from the {len(self.clients)} names in `partition.clients`")
            return self
        if self.clients is not None:
            raise ValueError(f"`partition.clients` is only for `partition.method: node_local` (got method {self.method})")
        if self.method != "by_field" and self.num_clients is None:
            raise ValueError(f"`partition.num_clients` is required for `partition.method: {self.method}`")
        if self.method in ("by_field", "dirichlet") and not self.field:
            raise ValueError(f"`partition.field` is required for `partition.method: {self.method}`")
        return self


class FederationConfig(Section):
    """What a round is and who runs it."""

    runtime: Literal["simulation", "flower"] = Field(
        "simulation", description="simulation: in-process; flower: a Flower SuperLink and SuperNodes (`fedlm flower run`)"
    )
    rounds: int = Field(3, ge=1)
    clients_per_round: int | None = Field(None, ge=1, description="default: every client, every round")
    min_clients: int = Field(1, ge=1, description="fewest valid updates for a round to be aggregated")
    round_retries: int = Field(
        0, ge=0, description="with fewer than min_clients updates, send the failed clients' tasks again up to this many times"
    )
    retry_wait_s: float = Field(0.0, ge=0.0, description="seconds to wait before each retry (e.g. for a node to restart)")
    max_num_examples: int | None = Field(
        None, ge=1, description="updates claiming more training examples than this are rejected (caps a client's weight)"
    )
    local_steps: int = Field(10, ge=1, description="optimizer steps per client per round")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0.0)
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="local optimizer, fresh every round")
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr / lr for linear and cosine")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    checkpoint_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


class AggregationConfig(BaseModel):
    """The server aggregator by registered name; its own parameters sit beside ``name`` and are checked by it."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = "fedavg"
    lora: Literal["naive", "exact", "ffa"] = Field(
        "naive",
        description="naive: average A and B; exact: average B A and SVD back (FlexLoRA); ffa: frozen A, B only",
    )

    def params(self) -> dict[str, Any]:
        """The aggregator's parameters: every key but ``name`` and ``lora``."""
        return dict(self.model_extra or {})


class AttackConfig(BaseModel):
    """Malicious clients in the simulation: which attack (by name), which clients, the attack's own parameters.

    ``clients`` names the attackers; ``fraction`` draws round(fraction * clients) of them with the config seed.
    The attack's parameters sit beside ``name`` and are checked by it at load.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str | None = Field(None, description="sign_flip | scaling | gaussian_noise | alie | ipm | corrupt_responses | backdoor | safety")
    clients: list[str] | None = None
    fraction: float | None = Field(None, gt=0.0, le=1.0)

    def params(self) -> dict[str, Any]:
        """The attack's parameters: every key but ``name``, ``clients`` and ``fraction``."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _who(self) -> AttackConfig:
        if self.name is None:
            if self.clients or self.fraction is not None or self.model_extra:
                raise ValueError("`attack.name` is required when `attack.clients`, `attack.fraction` or parameters are set")
            return self
        if (self.clients is None) == (self.fraction is None):
            raise ValueError("give exactly one of `attack.clients` (names) or `attack.fraction` (share of the clients)")
        if self.clients is not None and not self.clients:
            raise ValueError("`attack.clients` must name at least one client")
        return self


class ObjectiveConfig(BaseModel):
    """The training objective (``sft | clm | dpo``, :mod:`fedlm.objectives`). A bare string in YAML
    (``objective: sft``) means ``{name: sft}``; the objective's own parameters sit beside ``name``
    (``objective: {name: dpo, beta: 0.1}``) and are checked by it at load."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field("sft", description="sft (instruction tuning) | clm (raw text, continued pre-training) | dpo (preference pairs)")

    def params(self) -> dict[str, Any]:
        """The objective's parameters: every key but ``name``."""
        return dict(self.model_extra or {})


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


class EvalConfig(Section):
    """When and how the global model is evaluated."""

    every: int = Field(1, ge=0, description="evaluate every N rounds (0: only the last round)")
    at_start: bool = Field(True, description="evaluate the starting model as round 0")
    generate: bool = True
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1)
    max_examples: int | None = Field(None, ge=1, description="seeded subsample of the test set")
    audit: AuditConfig | None = Field(None, description="privacy audit at the end of the run (`fedlm audit`)")


class ExperimentConfig(Section):
    """One federated experiment."""

    seed: int = 0
    output_dir: str = "runs/experiment"
    model: ModelConfig = Field(default_factory=ModelConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        if self.partition.method == "node_local":
            self._node_local_checks()
        n, k = self.partition.num_clients, self.federation.clients_per_round
        if self.partition.clients is not None:
            n = len(self.partition.clients)
        if n is not None and k is not None and k > n:
            raise ValueError(
                f"`federation.clients_per_round` must be <= `partition.num_clients` ({n}), got {k}"
            )
        ranks = self.peft.client_ranks
        if isinstance(ranks, list) and n is not None and len(ranks) != n:
            raise ValueError(
                f"`peft.client_ranks` has {len(ranks)} entries but `partition.num_clients` is {n}; give one rank per client"
            )
        if k is not None and self.federation.min_clients > k:
            raise ValueError(
                f"`federation.min_clients` ({self.federation.min_clients}) must be <= "
                f"`federation.clients_per_round` ({k})"
            )
        return self

    def _node_local_checks(self) -> None:
        """``partition.method: node_local``: the data is on the SuperNodes; refuse what needs it on the server."""
        why = "with `partition.method: node_local` (each client's data stays on its SuperNode; the server has none)"
        if self.federation.runtime != "flower":
            raise ValueError(f"`federation.runtime` must be flower {why}; to simulate, put the clients' data in one file "
                             "with a client column and use `partition.method: by_field`")
        if self.data.test is None:
            raise ValueError(f"`data.test` is required {why}: the server evaluates on its own held-out set, "
                             "e.g. `data.test: embedded:wordnet_defs/test`")
        if self.attack.name is not None:
            raise ValueError(f"`attack.name` cannot be used {why}: the attack harness rewrites clients' data or updates in the "
                             "simulation; run attacks with a split of one dataset (`partition.method: by_field` or iid)")
        if self.eval.audit is not None:
            raise ValueError(f"`eval.audit` cannot be used {why}: the audit needs the members' training examples")
        if self.privacy.sample_dp is not None and self.privacy.sample_dp.target_epsilon is not None:
            raise ValueError(f"`privacy.sample_dp.target_epsilon` cannot be solved {why}: it needs the smallest client's "
                             "dataset size; give `privacy.sample_dp.noise_multiplier` (each client logs its own epsilon)")
