"""Rules on LoRA aggregation modes, the starting adapter and the objective's needs."""

from __future__ import annotations

from fedlm.aggregation.lora.mode import LORA_MODES
from fedlm.attacks import attack_spec
from fedlm.config.rules.setting import SECAGG, Setting
from fedlm.core.errors import FedlmError
from fedlm.objectives import objective_of

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
