"""Every cross-section compatibility rule of the experiment config, in one place.

A section's own constraints (a range, a required key) live in its schema (:mod:`fedlm.config.schema`); a
component's constraints on its own parameters live with the component (an aggregator's or objective's
``check_config``, so that adding one touches one file). Everything else, a combination of sections that cannot
work, is one small function here whose docstring says why. :func:`check_config` runs the rules a config can be
judged on at load (:func:`fedlm.config.io.validate_config` calls it); :func:`check_federation` runs those that
need the real client names (called when a run's data is partitioned).

Rules ask components for their declared capabilities (``needs_individual_updates``, ``uploads_extras``,
``byzantine_bound``, ...), never for their names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from fedlm.aggregation.base import Aggregator, aggregator_class, build_aggregator, registered_aggregators
from fedlm.aggregation.lora.client_ranks import resolve_client_ranks
from fedlm.aggregation.lora.mode import LORA_MODES
from fedlm.attacks import attack_spec, build_attack_params
from fedlm.attacks.harness import worst_round_attackers
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.models.hardware import attn_refusal, device_refusal, engine_refusal, quantization_refusal, resolve_device
from fedlm.objectives import objective_of
from fedlm.privacy.canary_audit import audit_client
from fedlm.privacy.client_dp import dp_compatible_aggregators, wrap_refusal
from fedlm.privacy.ledger import PrivacyLedger
from fedlm.privacy.secagg.quantize import max_summands
from fedlm.privacy.secagg.threshold import share_holders, threshold
from fedlm.privacy.setup import dp_account, wrap_with_dp

SECAGG = "privacy.secure_aggregation"
NODE_LOCAL = "with `partition.method: node_local` (each client's data stays on its SuperNode; the server has none)"


@dataclass
class Setting:
    """What a rule judges: the config, the number of clients when known, and the configured aggregator (built on
    first use, so an unknown ``aggregation.name`` is reported by the first rule that needs it)."""

    config: ExperimentConfig
    num_clients: int | None = None
    client_names: Sequence[str] = field(default_factory=list)

    @cached_property
    def aggregator(self) -> Aggregator:
        agg = self.config.aggregation
        return build_aggregator(agg.name, agg.params())

    @cached_property
    def dp_account(self) -> PrivacyLedger | None:
        """Client DP's accounting (its noise multiplier solved for a target epsilon), once per setting."""
        if self.config.privacy.client_dp is None or self.num_clients is None:
            return None
        return dp_account(self.config, self.num_clients)

    @property
    def per_round(self) -> int | None:
        """Clients per round: ``federation.clients_per_round``, else all of them (None while unknown)."""
        return self.config.federation.clients_per_round or self.num_clients


Rule = Callable[[Setting], None]


def known_num_clients(config: ExperimentConfig) -> int | None:
    """The number of clients when the config alone tells it (``partition.clients`` or ``partition.num_clients``)."""
    return len(config.partition.clients) if config.partition.clients is not None else config.partition.num_clients


# ------------------------------------------------------------------------------------------ federation shape


def node_local_keeps_data_on_the_nodes(s: Setting) -> None:
    """``node_local``: the data is on the SuperNodes, so refuse what needs it in the simulation or on the server."""
    c = s.config
    if c.partition.method != "node_local":
        return
    if c.federation.runtime != "flower":
        raise FedlmError(
            f"`federation.runtime` must be flower {NODE_LOCAL}; to simulate, put the clients' data in one file "
            "with a client column and use `partition.method: by_field`"
        )
    if c.data.test is None:
        raise FedlmError(
            f"`data.test` is required {NODE_LOCAL}: the server evaluates on its own held-out set, e.g. `data.test: embedded:wordnet_defs/test`"
        )
    if c.attack.name is not None:
        raise FedlmError(
            f"`attack.name` cannot be used {NODE_LOCAL}: the attack harness rewrites clients' data or updates in "
            "the simulation; run attacks with a split of one dataset (`partition.method: by_field` or iid)"
        )
    if c.eval.audit is not None:
        raise FedlmError(f"`eval.audit` cannot be used {NODE_LOCAL}: the audit needs the members' training examples")
    if c.privacy.sample_dp is not None and c.privacy.sample_dp.target_epsilon is not None:
        raise FedlmError(
            f"`privacy.sample_dp.target_epsilon` cannot be solved {NODE_LOCAL}: it needs the smallest client's "
            "dataset size; give `privacy.sample_dp.noise_multiplier` (each client logs its own epsilon)"
        )


def clients_per_round_within_federation(s: Setting) -> None:
    """A round cannot sample more clients than the federation has."""
    n, k = s.num_clients, s.config.federation.clients_per_round
    if n is not None and k is not None and k > n:
        raise FedlmError(f"`federation.clients_per_round` must be <= `partition.num_clients` ({n}), got {k}")


def client_ranks_one_per_client(s: Setting) -> None:
    """A list of client ranks is read in client order, so it needs one entry per client."""
    ranks, n = s.config.peft.client_ranks, s.num_clients
    if isinstance(ranks, list) and n is not None and len(ranks) != n:
        raise FedlmError(f"`peft.client_ranks` has {len(ranks)} entries but `partition.num_clients` is {n}; give one rank per client")


def min_clients_within_round(s: Setting) -> None:
    """A round with fewer sampled clients than ``min_clients`` could never be aggregated."""
    fed = s.config.federation
    if fed.clients_per_round is not None and fed.min_clients > fed.clients_per_round:
        raise FedlmError(f"`federation.min_clients` ({fed.min_clients}) must be <= `federation.clients_per_round` ({fed.clients_per_round})")


# ------------------------------------------------------------------------------------------ aggregation, attacks


def aggregator_accepts_config(s: Setting) -> None:
    """A known aggregator with valid parameters, and settings it can honour (its own ``check_config``)."""
    s.aggregator.check_config(s.config)


def attack_parameters_valid(s: Setting) -> None:
    """The attack's parameters are checked by the attack at load, not when the first attacker trains."""
    if s.config.attack.name is not None:
        build_attack_params(s.config.attack.name, s.config.attack.params())


def attackers_within_bounds(s: Setting) -> None:
    """A robust aggregator bounds only so many attackers per round (its declared ``byzantine_bound``), and ALIE's
    perturbation is defined for a minority of attackers; refuse an attacker share beyond either."""
    config, n = s.config, s.num_clients
    if config.attack.name is None or n is None:
        return
    k, f = worst_round_attackers(config, n)
    who = f"`attack.fraction` {config.attack.fraction} of {n} clients" if config.attack.fraction else f"`attack.clients` ({f})"
    name, bound = config.aggregation.name, s.aggregator.byzantine_bound
    if bound is not None:
        assumed = int(getattr(s.aggregator.params, bound.assumed_param, 0)) if bound.assumed_param else 0
        f_bound = max(f, assumed)
        if not bound.holds(k, f_bound):
            raise FedlmError(
                f"{who} gives up to f = {f_bound} attackers among the K = {k} updates of a round, but "
                f"`aggregation.name: {name}` bounds them only when {bound.formula(f_bound)} ({bound.source}); "
                "lower the attacker share or raise `federation.clients_per_round`"
            )
    if config.attack.name == "alie" and 2 * f >= k:
        raise FedlmError(
            f"`attack.name: alie` needs the attackers to be a minority of a round (2f < n), but {who} gives up to "
            f"f = {f} of n = {k}; lower the attacker share or raise `federation.clients_per_round`"
        )


# ------------------------------------------------------------------------------------------ differential privacy


def client_dp_target_reachable(s: Setting) -> None:
    """``privacy.client_dp.target_epsilon`` is solved for a noise multiplier at load, so an unreachable target fails
    before any model loads (needs the number of clients for the sampling rate)."""
    _ = s.dp_account


def distributed_dp_needs_secure_aggregation(s: Setting) -> None:
    """Distributed DP splits the noise among the clients: private only when the server sees just the sum."""
    dp = s.config.privacy.client_dp
    if dp is not None and dp.mode == "distributed" and s.config.privacy.secure_aggregation is None:
        raise FedlmError(
            "`privacy.client_dp.mode: distributed` splits the noise among the clients and is private only when the "
            "server sees just the sum; set `privacy.secure_aggregation` too, or use `mode: central`"
        )


def client_dp_needs_only_the_sum(s: Setting) -> None:
    """Client DP hands the aggregator one noised sum: refuse an aggregator that declares it needs each update
    (``needs_individual_updates``, ``needs_server_update``) or uploads what DP does not protect (``uploads_extras``)."""
    if s.config.privacy.client_dp is None:
        return
    reason = wrap_refusal(s.aggregator)
    if reason is not None:
        raise FedlmError(
            f"`privacy.client_dp`: differential privacy cannot wrap `aggregation.name: {s.config.aggregation.name}`: "
            f"{reason}; use one of {', '.join(dp_compatible_aggregators())}, or remove `privacy.client_dp`"
        )


def client_dp_wrapper_settings(s: Setting) -> None:
    """The DP wrapper's own parameters (e.g. adaptive clipping's count noise) are checked by building it."""
    if s.config.privacy.client_dp is not None and s.num_clients is not None:
        wrap_with_dp(s.aggregator, s.config, s.num_clients, s.dp_account)


def sample_dp_covers_every_upload(s: Setting) -> None:
    """DP-SGD noises the local steps only: a client hook that uploads a plain gradient (SCAFFOLD option I's control
    variate at the server model) would leak past it."""
    if s.config.privacy.sample_dp is None:
        return
    if any(hook.needs_start_gradient for hook in s.aggregator.trainer_hooks()):
        raise FedlmError(
            f"`privacy.sample_dp` cannot run with `aggregation.name: {s.config.aggregation.name}` and "
            f"`aggregation.option: {getattr(s.aggregator.params, 'option', '?')}`: that control variate is the client's "
            "plain gradient at the server model (no per-example clipping, no noise) and is uploaded, bypassing DP-SGD; "
            "use `aggregation.option: II` (with `federation.optimizer: sgd`) or remove `privacy.sample_dp`"
        )


def sample_dp_needs_lora(s: Setting) -> None:
    """Opacus's per-example gradients are exact for LoRA's nn.Linear factors only."""
    method = s.config.peft.method
    if s.config.privacy.sample_dp is not None and method != "lora":
        raise FedlmError(
            f"`privacy.sample_dp` needs `peft.method: lora`, got {method!r}: DP-SGD takes per-example gradients from "
            "Opacus, which are exact for LoRA's nn.Linear factors only (not for DoRA's norm, IA3's scaling vectors, "
            "the soft prompt shared across a batch, or every layer of the full model); use `peft.method: lora` or "
            "client-level DP (`privacy.client_dp`)"
        )


# ------------------------------------------------------------------------------------------ secure aggregation


def _secagg_compatible_aggregators() -> list[str]:
    """Names of the registered aggregators that work on the sum of the updates alone."""
    return [name for name in registered_aggregators() if _needs_each_update(aggregator_class(name)) is None]


def _needs_each_update(agg: type[Aggregator] | Aggregator) -> str | None:
    """Why ``agg`` needs more than the sum of the updates (its declared capabilities), or None."""
    if agg.needs_individual_updates is not None:
        return agg.needs_individual_updates
    if agg.uploads_extras is not None:
        return f"it uploads {agg.uploads_extras} beside the delta, which the masked sum does not carry"
    if agg.needs_server_update:
        return "it compares each client's update with the server's own"
    return None


def secure_aggregation_needs_only_the_sum(s: Setting) -> None:
    """Under secure aggregation the server learns only the sum of the updates."""
    if s.config.privacy.secure_aggregation is None:
        return
    reason = _needs_each_update(s.aggregator)
    if reason is not None:
        raise FedlmError(
            f"`{SECAGG}` shows the server only the sum of the updates, but `aggregation.name: {s.config.aggregation.name}` "
            f"needs the individual ones: {reason}; use one of {', '.join(_secagg_compatible_aggregators())}"
        )


def secure_aggregation_lora_mode(s: Setting) -> None:
    """A masked sum of factors is no sum of products (``exact``), and ``naive``'s per-rank weights need every
    client's rank beside its update."""
    c = s.config
    if c.privacy.secure_aggregation is None:
        return
    if c.aggregation.lora == "exact":
        raise FedlmError(
            f"`{SECAGG}` sums what clients send, but `aggregation.lora: exact` needs each client's own "
            "product B_k A_k (a sum of factors is not a sum of products); use `aggregation.lora: naive` or `ffa`"
        )
    if c.peft.client_ranks is not None and c.aggregation.lora == "naive":
        raise FedlmError(
            f"`{SECAGG}` with `peft.client_ranks` needs `aggregation.lora: ffa`: naive's per-rank "
            "weighting needs every client's rank and example count beside its update"
        )


def secure_aggregation_without_adaptive_clipping(s: Setting) -> None:
    """Adaptive clipping needs each client's clipped bit, which would have to be summed securely too."""
    dp = s.config.privacy.client_dp
    if s.config.privacy.secure_aggregation is not None and dp is not None and dp.adaptive:
        raise FedlmError(
            f"`{SECAGG}` with `privacy.client_dp.adaptive: true` is not supported: the clipped count of "
            "each client would have to be summed securely too; set `adaptive: false`"
        )


def secure_aggregation_neighbours_even(s: Setting) -> None:
    """SecAgg+'s Harary graph puts k/2 neighbours on each side of a client."""
    sa = s.config.privacy.secure_aggregation
    if sa is not None and sa.neighbours is not None and sa.neighbours % 2:
        raise FedlmError(f"`{SECAGG}.neighbours` must be even (k/2 on each side of the SecAgg+ Harary graph), got {sa.neighbours}")


def secure_aggregation_threshold(s: Setting) -> None:
    """The threshold must let a round finish, stay within the share holders, and exceed half of them; the quantised
    sum must fit the 2^32 modulus (needs the number of clients)."""
    sa, per_round = s.config.privacy.secure_aggregation, s.per_round
    if sa is None or per_round is None:
        return
    holders = share_holders(sa, per_round)
    t = threshold(sa, per_round)
    if t > per_round:
        raise FedlmError(f"`{SECAGG}.threshold` {t} is above the clients per round ({per_round}); no round could finish")
    if t > holders:
        raise FedlmError(
            f"`{SECAGG}.threshold` {t} is above the {holders} holders of each client's shares "
            f"(its {holders - 1} neighbours and itself); lower it or raise `{SECAGG}.neighbours`"
        )
    if 2 * t <= holders:
        raise FedlmError(
            f"`{SECAGG}.threshold` {t} must be more than half of the {holders} share holders, or the server "
            "could rebuild both a client's self-mask and its mask key from two disjoint groups "
            f"(Bonawitz et al. 2017, Sec. 4); use at least {holders // 2 + 1}"
        )
    if per_round > max_summands(sa.quantization_bits):
        raise FedlmError(
            f"`{SECAGG}.quantization_bits` {sa.quantization_bits}: {per_round} clients x (2^{sa.quantization_bits} - 1) "
            f"overflows the 2^32 modulus; use at most {max_summands(sa.quantization_bits)} clients or fewer bits"
        )


# ------------------------------------------------------------------------------------------ LoRA, adapters, objective


def lora_modes_need_lora(s: Setting) -> None:
    """``exact`` re-factorises the mean of the products B A and ``ffa`` freezes A: both for plain LoRA only."""
    method, mode = s.config.peft.method, s.config.aggregation.lora
    if mode != "naive" and method != "lora":
        why = "the DoRA magnitude normalises W + B A, so " if method == "dora" else ""
        raise FedlmError(
            f"`aggregation.lora: {mode}` needs `peft.method: lora`, got {method!r}: {why}exact re-factorises the mean "
            "of the products B A and ffa freezes A, both for plain LoRA factors only; "
            "use `aggregation.lora: naive` (plain per-tensor averaging) for other methods"
        )


def exact_lora_keeps_no_factor_state(s: Setting) -> None:
    """State kept on the factors A and B across rounds (``needs_stable_parameter_space``) would refer to factors that
    ``exact`` replaces by SVD every round."""
    name = s.config.aggregation.name
    if s.config.aggregation.lora == "exact" and s.aggregator.needs_stable_parameter_space:
        raise FedlmError(
            f"`aggregation.name: {name}` keeps per-client state on the LoRA factors A and B across rounds, but "
            "`aggregation.lora: exact` re-factorises A and B by SVD every round, so that state would refer to "
            "factors that no longer exist; use `aggregation.lora: naive` or `ffa` with it"
        )


def lora_mode_fits(s: Setting) -> None:
    """What a LoRA mode declares it cannot do (:class:`~fedlm.aggregation.lora.mode.LoraMode` capabilities): run on a
    masked sum, under an aggregator that keeps state on the factors, on data-parallel client processes, with DPO's
    reference swap (a mode that keeps a frozen residual), or with clients of different ranks."""
    c, mode = s.config, s.config.aggregation.lora
    cls = LORA_MODES.get(mode)
    if c.privacy.secure_aggregation is not None and cls.needs_each_update is not None:
        raise FedlmError(
            f"`{SECAGG}` shows the server only a sum, but `aggregation.lora: {mode}` {cls.needs_each_update}; use `naive`, `ffa` or `rolora`"
        )
    if s.aggregator.needs_stable_parameter_space and not cls.factor_space:
        raise FedlmError(
            f"`aggregation.name: {c.aggregation.name}` keeps per-client state on the LoRA factors A and B, but "
            f"`aggregation.lora: {mode}` aggregates in another space ({cls.space}); use `naive`, `ffa` or `rolora` with it"
        )
    if c.federation.client_processes > 1 and cls.client_extra is not None:
        raise FedlmError(
            f"`federation.client_processes: {c.federation.client_processes}` copies only the trainable adapter tensors to "
            f"its processes, but `aggregation.lora: {mode}` also computes with {cls.client_extra}; use `federation.client_processes: 1`"
        )
    if cls.keeps_residual and c.objective.name == "dpo":
        raise FedlmError(
            f"`objective: dpo` swaps in a reference adapter for its reference model, which would drop the frozen residual "
            f"that `aggregation.lora: {mode}` keeps per module; use `aggregation.lora: exact` or `rolora` with DPO"
        )
    if c.peft.client_ranks is not None and cls.refuses_client_ranks is not None:
        raise FedlmError(f"`peft.client_ranks` with `aggregation.lora: {mode}`: {cls.refuses_client_ranks}; remove `peft.client_ranks`")


def init_adapter_fits(s: Setting) -> None:
    """``model.init_adapter`` must have been trained with the same base model and ``peft`` settings."""
    if s.config.model.init_adapter is not None:
        from fedlm.models.init_adapter import check_init_adapter  # noqa: PLC0415 - imports peft: load lazily

        check_init_adapter(s.config)


def objective_accepts_config(s: Setting) -> None:
    """A known objective with valid parameters, and settings it can honour (its own ``check_config``)."""
    objective_of(s.config).check_config(s.config)


def audit_needs_sft(s: Setting) -> None:
    """The privacy audit's canaries and membership scores are instruction answers."""
    name = s.config.objective.name
    if s.config.eval.audit is not None and name != "sft":
        raise FedlmError(
            f"`eval.audit` needs `objective: sft` (its canaries and membership scores are instruction answers), got "
            f"`objective: {name}`; remove `eval.audit`"
        )


def data_attacks_need_sft(s: Setting) -> None:
    """A data attack rewrites instruction records."""
    name, attack = s.config.objective.name, s.config.attack.name
    if attack is not None and name != "sft" and attack_spec(attack).kind == "data":
        raise FedlmError(
            f"`attack.name: {attack}` rewrites instruction records and needs `objective: sft`, got "
            f"`objective: {name}`; use an update attack (sign_flip, scaling, gaussian_noise, alie, ipm)"
        )


# ------------------------------------------------------------------------------------------ model hardware knobs


def model_device_exists(s: Setting) -> None:
    """``model.device`` names a device this machine has: no ``cuda`` without a GPU, no ``cuda:3`` on two GPUs."""
    reason = device_refusal(s.config.model.device)
    if reason is not None:
        raise FedlmError(reason)


def quantization_runs_on_device(s: Setting) -> None:
    """A quantized base needs bitsandbytes with a backend for the device (CPU since 0.48, CUDA)."""
    model = s.config.model
    reason = quantization_refusal(model.quantization, resolve_device(model.device))
    if reason is not None:
        raise FedlmError(reason)


def attention_runs_on_device(s: Setting) -> None:
    """``flash_attention_2`` needs a CUDA device and the flash-attn package."""
    model = s.config.model
    reason = attn_refusal(model.attn_implementation, resolve_device(model.device))
    if reason is not None:
        raise FedlmError(reason)


def full_needs_unquantized_base(s: Setting) -> None:
    """A 4-bit or 8-bit weight has no gradient step: ``full`` would train a model it cannot update."""
    quantization = s.config.model.quantization
    if quantization != "none" and s.config.peft.method == "full":
        raise FedlmError(
            f"`peft.method: full` trains every base weight, but `model.quantization: {quantization}` stores the base as "
            "frozen integer blocks that no optimizer step can update; use `model.quantization: none` for full "
            "fine-tuning, or a parameter-efficient method (e.g. `peft.method: lora`, QLoRA) on the quantized base"
        )


def checkpointing_fits_the_method(s: Setting) -> None:
    """Gradient checkpointing re-runs each layer's forward in the backward pass: peft's prefix tuning passes its
    prefixes as a key/value cache that the recomputation cannot replay, and Opacus's per-example gradient hooks
    (``privacy.sample_dp``) lose the activations they record in the forward."""
    c = s.config
    if not c.model.gradient_checkpointing:
        return
    if c.peft.method == "prefix_tuning":
        raise FedlmError(
            "`model.gradient_checkpointing: true` does not work with `peft.method: prefix_tuning` (peft passes the "
            "prefixes as a key/value cache, which checkpointing cannot recompute); set `model.gradient_checkpointing: "
            "false` or use `peft.method: prompt_tuning` or lora"
        )
    if c.privacy.sample_dp is not None:
        raise FedlmError(
            "`model.gradient_checkpointing: true` does not work with `privacy.sample_dp`: Opacus takes per-example "
            "gradients from activations its hooks record in the forward pass, which checkpointing discards and "
            "recomputes; set `model.gradient_checkpointing: false` (lower `federation.batch_size` to save memory)"
        )


# ------------------------------------------------------------------------------------------ data-parallel clients


def client_processes_not_in_ray_workers(s: Setting) -> None:
    """A data-parallel client's worker processes are started by the simulation or by a SuperNode's ClientApp; a Ray
    worker of Flower's simulation engine serves many clients and does not start them."""
    fed = s.config.federation
    if fed.client_processes > 1 and fed.runtime == "flower-simulation":
        raise FedlmError(
            f"`federation.client_processes: {fed.client_processes}` is not built for `federation.runtime: flower-simulation`: "
            "a Ray worker serves many clients and does not start data-parallel processes; give each client GPUs or CPUs "
            "through `federation.simulation_engine` instead, or use `federation.runtime: simulation` or `flower`"
        )


def client_processes_split_a_plain_batch(s: Setting) -> None:
    """Every process needs at least one example of each step's batch, and DP-SGD's Poisson lots with per-example
    clipping would need Opacus's own distributed path, which fedlm does not run."""
    fed, n = s.config.federation, s.config.federation.client_processes
    if n > 1 and s.config.privacy.sample_dp is not None:
        raise FedlmError(
            f"`federation.client_processes: {n}` cannot run with `privacy.sample_dp`: DP-SGD's per-example clipping "
            "and noise would have to be split among the processes (Opacus's DP-DDP path), which fedlm does not do; "
            "use `federation.client_processes: 1` or remove `privacy.sample_dp`"
        )
    if n > fed.batch_size:
        raise FedlmError(
            f"`federation.client_processes` ({n}) must be <= `federation.batch_size` ({fed.batch_size}): each process "
            "takes a share of every step's batch; raise `federation.batch_size` or lower `federation.client_processes`"
        )


# ------------------------------------------------------------------------------------------ personalization


def personalization_runs_in_the_simulation(s: Setting) -> None:
    """A client's personal state lives in ``RUN_DIR/clients/<name>/`` of the in-process simulation; a SuperNode's
    ClientApp does not train or keep one yet (and ``node_local`` runs only over Flower)."""
    c = s.config
    method = c.personalization.method
    if method is not None and (c.federation.runtime != "simulation" or c.partition.method == "node_local"):
        raise FedlmError(
            f"`personalization.method: {method}` is built for the in-process simulation only: a SuperNode (or a Ray worker of "
            f"`{c.federation.runtime}`) does not train or keep "
            "personal state yet; use `federation.runtime: simulation` (and a partition other than node_local) or "
            "remove `personalization`"
        )


def personalization_fits_the_adapter(s: Setting) -> None:
    """Personal models are peft adapters (loadable with ``PeftModel.from_pretrained``); FedSA-LoRA and FedDPA work
    on LoRA factors; FedSA-LoRA averages A factor by factor (``aggregation.lora: naive``), the one thing it shares."""
    c = s.config
    method = c.personalization.method
    if method is None:
        return
    if c.peft.method == "full":
        raise FedlmError(f"`personalization.method: {method}` keeps a personal peft adapter per client; `peft.method: full` has none: use lora")
    if method in ("fedsa", "dual") and c.peft.method != "lora":
        raise FedlmError(f"`personalization.method: {method}` needs `peft.method: lora` (it works on LoRA's A and B), got {c.peft.method!r}")
    if method == "fedsa" and c.aggregation.lora != "naive":
        raise FedlmError(
            f"`personalization.method: fedsa` shares and averages LoRA A alone; `aggregation.lora: {c.aggregation.lora}` "
            "does not (exact averages B A, ffa freezes A): use `aggregation.lora: naive`"
        )
    if c.federation.algorithm == "fedkseed":
        raise FedlmError(
            f"`personalization.method: {method}` trains personal state with gradients beside the global update; "
            "`federation.algorithm: fedkseed` trains by zeroth-order steps only: use one of them"
        )
    if method == "prompt":
        _prompt_fits(c)


def _prompt_fits(c: ExperimentConfig) -> None:
    """A soft prompt goes in front of token inputs (sft, clm) of the one in-process model, beside a weight adapter."""
    if c.peft.method not in ("lora", "dora", "ia3"):
        raise FedlmError(
            f"`personalization.method: prompt` adds a soft prompt beside a weight adapter; `peft.method: {c.peft.method}` is not one: use lora"
        )
    if c.objective.name not in ("sft", "clm"):
        raise FedlmError(f"`personalization.method: prompt` needs `objective: sft` or `clm`, got {c.objective.name!r}")
    if c.federation.client_processes > 1 or c.privacy.sample_dp is not None:
        raise FedlmError(
            "`personalization.method: prompt` runs its soft prompt in the one in-process model: not with "
            "`federation.client_processes` > 1 nor `privacy.sample_dp` (per-example gradients); remove those"
        )


# ------------------------------------------------------------------------------------------ update compression


def compression_downlink_in_the_simulation(s: Setting) -> None:
    """Downlink compression keeps the clients' replica of the global model on the server; over Flower each node
    would have to keep and advance its own replica, which is not built, so the option is refused there."""
    down = s.config.compression.downlink
    if down is None:
        return
    if s.config.federation.runtime != "simulation":
        raise FedlmError(
            f"`compression.downlink` is not built for `federation.runtime: {s.config.federation.runtime}` yet: each node would have to "
            "keep and advance its own replica of the global model; use it in the simulation, or remove it "
            "(`compression.uplink` runs over Flower)"
        )
    if down.error_feedback is False:
        raise FedlmError(
            "`compression.downlink.error_feedback: false` is not an option: the server encodes the difference between "
            "the global model and the clients' replica, so what one round drops is sent in a later one; remove the key"
        )


def uplink_compression_not_under_secure_aggregation(s: Setting) -> None:
    """SecAgg+ sums every client's whole update on one integer grid in its field; neither codec fits that."""
    uplink = s.config.compression.uplink
    if uplink is None or s.config.privacy.secure_aggregation is None:
        return
    if uplink.method == "topk":
        why = (
            "each client keeps different coordinates, and the masked sum needs every client's full vector on the same "
            "coordinates (the indices would also tell the server where each client's update is large)"
        )
    else:
        why = (
            "each client's per-block scales differ, so its codes do not add up to the sum in the field; secure "
            f"aggregation already quantizes every coordinate into its field: set `{SECAGG}.quantization_bits` instead"
        )
    raise FedlmError(f"`compression.uplink.method: {uplink.method}` cannot run under `{SECAGG}`: {why}; remove `compression.uplink`")


def fedkseed_fits_the_run(s: Setting) -> None:
    """FedKSeed's clients take zeroth-order steps and upload (seed, scalar) pairs that the server replays: anything that
    needs a gradient, per-client hooks, each client's dense vector under masks, or a SuperNode trainer is refused."""
    config = s.config
    if config.federation.algorithm != "fedkseed":
        return
    prefix = "`federation.algorithm: fedkseed`"
    if config.privacy.sample_dp is not None:
        raise FedlmError(
            f"{prefix} cannot run with `privacy.sample_dp`: DP-SGD clips and noises per-example gradients, and a zeroth-order "
            "step has none (its one scalar per batch would need its own clipping and accounting, which fedlm does not do); "
            "use `privacy.client_dp` (the server clips and noises each replayed update) or the gradient algorithm"
        )
    if config.privacy.secure_aggregation is not None:
        raise FedlmError(f"{prefix} cannot run under `{SECAGG}`: the server must replay each client's own (seed, gradient) pairs")
    if config.compression.uplink is not None:
        raise FedlmError(f"{prefix} uploads a few bytes per step already; remove `compression.uplink`")
    if config.federation.runtime != "simulation":
        raise FedlmError(
            f"{prefix} is not built for `federation.runtime: {config.federation.runtime}` yet (the node trains with gradients); use the simulation"
        )
    if config.federation.client_processes > 1:
        raise FedlmError(f"{prefix} runs each client on one process; set `federation.client_processes: 1`")
    if config.peft.client_ranks:
        raise FedlmError(f"{prefix} perturbs every trainable component, so per-client LoRA ranks do not apply; remove `peft.client_ranks`")
    if config.aggregation.lora in ("fedex", "flora", "rolora"):
        raise FedlmError(
            f"{prefix} perturbs every trainable LoRA factor and replays plain deltas; `aggregation.lora: {config.aggregation.lora}` "
            "needs gradient steps on a frozen factor or a server residual the pairs do not carry: use `aggregation.lora: naive`"
        )
    agg = s.aggregator
    if agg.trainer_hooks() or agg.uploads_extras is not None:
        raise FedlmError(
            f"{prefix} runs no client-side hooks and uploads nothing but the pairs, but `aggregation.name: {config.aggregation.name}` "
            "needs them; use an aggregator that takes plain deltas (e.g. fedavg, fedadam, median)"
        )
    if config.federation.fedkseed.downlink == "seeds":
        _seed_downlink_fits(config, agg)


def _seed_downlink_fits(config: ExperimentConfig, agg: Aggregator) -> None:
    """The broadcast (seed, coefficient) lists are FedAvg's step on the clients' pairs: any other server step, noise,
    an altered update or a compressed replica would not be what the lists rebuild."""
    why = None
    if not agg.example_weighted_mean or config.aggregation.lora != "naive":
        why = (
            f"it is FedAvg's step (an example-weighted mean of the deltas) on plain factors, not `aggregation.name: "
            f"{config.aggregation.name}` with `aggregation.lora: {config.aggregation.lora}`"
        )
    elif config.privacy.client_dp is not None:
        why = "client DP's noise is not a combination of the seeds' perturbations"
    elif config.attack.name is not None:
        why = "an attack alters the replayed update, which the lists (built from the pairs) would not carry"
    elif config.compression.downlink is not None:
        why = "the lists rebuild the global model exactly; `compression.downlink` would compress it again"
    if why is not None:
        raise FedlmError(f"`federation.fedkseed.downlink: seeds` cannot run here: {why}; set `federation.fedkseed.downlink: dense`")


# ------------------------------------------------------------------------------------------ Flower's simulation engine


def simulation_engine_fits_this_machine(s: Setting) -> None:
    """``flower-simulation`` reserves ``num_cpus``/``num_gpus`` per client in Ray: refuse at load what Ray could not
    give (more than the machine has, a GPU that is not there, a client device its worker cannot see), never a CUDA
    traceback in the middle of a round (:func:`fedlm.models.hardware.engine_refusal`)."""
    if s.config.federation.runtime != "flower-simulation":
        return
    engine = s.config.federation.simulation_engine
    reason = engine_refusal(engine.num_cpus, engine.num_gpus, engine.ray_cpus, engine.address, s.config.model.device)
    if reason is not None:
        raise FedlmError(reason)


#: The rules judged at config load, in the order they are checked (the first refusal is reported).
LOAD_RULES: tuple[Rule, ...] = (
    model_device_exists,
    quantization_runs_on_device,
    attention_runs_on_device,
    full_needs_unquantized_base,
    checkpointing_fits_the_method,
    node_local_keeps_data_on_the_nodes,
    clients_per_round_within_federation,
    client_ranks_one_per_client,
    min_clients_within_round,
    aggregator_accepts_config,
    attack_parameters_valid,
    attackers_within_bounds,
    client_dp_target_reachable,
    distributed_dp_needs_secure_aggregation,
    client_dp_needs_only_the_sum,
    client_dp_wrapper_settings,
    sample_dp_covers_every_upload,
    secure_aggregation_needs_only_the_sum,
    secure_aggregation_lora_mode,
    secure_aggregation_without_adaptive_clipping,
    secure_aggregation_neighbours_even,
    secure_aggregation_threshold,
    lora_modes_need_lora,
    sample_dp_needs_lora,
    exact_lora_keeps_no_factor_state,
    lora_mode_fits,
    init_adapter_fits,
    objective_accepts_config,
    audit_needs_sft,
    data_attacks_need_sft,
    client_processes_not_in_ray_workers,
    client_processes_split_a_plain_batch,
    personalization_runs_in_the_simulation,
    personalization_fits_the_adapter,
    compression_downlink_in_the_simulation,
    uplink_compression_not_under_secure_aggregation,
    fedkseed_fits_the_run,
    simulation_engine_fits_this_machine,
)


def check_config(config: ExperimentConfig) -> None:
    """Run every load-time rule on ``config``; the first that refuses raises :class:`FedlmError` naming the fields."""
    setting = Setting(config, known_num_clients(config))
    for rule in LOAD_RULES:
        rule(setting)


# ------------------------------------------------------------------------------------------ the real federation


def clients_per_round_within_clients(s: Setting) -> None:
    """A round cannot sample more clients than the partition produced."""
    n, k = len(s.client_names), s.config.federation.clients_per_round
    if k is not None and k > n:
        raise FedlmError(f"`federation.clients_per_round` must be <= the number of clients ({n}), got {k}")


def client_ranks_fit_clients(s: Setting) -> None:
    """``peft.client_ranks`` must name (or list, in order) the partition's clients."""
    resolve_client_ranks(s.config.peft.client_ranks, s.client_names, s.config.peft.r)


def audit_client_exists(s: Setting) -> None:
    """``eval.audit.canary_client`` must be one of the partition's clients."""
    if s.config.eval.audit is not None:
        audit_client(s.config.eval.audit, s.client_names)


#: The rules judged once the partition gives the client names, in order.
FEDERATION_RULES: tuple[Rule, ...] = (
    clients_per_round_within_clients,
    client_ranks_fit_clients,
    audit_client_exists,
    attackers_within_bounds,
    secure_aggregation_threshold,
)


def check_federation(config: ExperimentConfig, client_names: Sequence[str]) -> None:
    """Run the rules that need the real federation (the partition's ``client_names``); FedlmError on the first refusal."""
    setting = Setting(config, len(client_names), list(client_names))
    for rule in FEDERATION_RULES:
        rule(setting)
