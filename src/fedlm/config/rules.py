"""Config-load checks that need the aggregator registry: parameters in their domain, and combinations that work.

Called by :func:`fedlm.config.io.validate_config`, so a bad ``aggregation`` section fails before any model loads.
"""

from __future__ import annotations

from fedlm.aggregation.base import build_aggregator
from fedlm.attacks import attack_spec
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.objectives import objective_of


def check_aggregation(config: ExperimentConfig) -> None:
    """Raise :class:`FedlmError` naming the field when the aggregation settings cannot be honoured."""
    agg = config.aggregation
    aggregator = build_aggregator(agg.name, agg.params())
    aggregator.check_config(config)
    _check_attack(config)
    if config.privacy.client_dp is not None and config.partition.num_clients is not None:
        from fedlm.privacy.setup import wrap_with_dp  # solves a target epsilon and refuses combinations now

        wrap_with_dp(aggregator, config, config.partition.num_clients)
    if config.privacy.sample_dp is not None:
        from fedlm.privacy.sample_dp import check_sample_dp

        check_sample_dp(config, aggregator)
    if config.privacy.secure_aggregation is not None:
        from fedlm.privacy.secagg.checks import check_secure_aggregation

        check_secure_aggregation(config, aggregator, config.partition.num_clients)
    _check_peft_method(config)
    if agg.lora == "exact" and aggregator.needs_stable_parameter_space:
        raise FedlmError(
            f"`aggregation.name: {agg.name}` keeps per-client state on the LoRA factors A and B across rounds, but "
            "`aggregation.lora: exact` re-factorises A and B by SVD every round, so that state would refer to "
            "factors that no longer exist; use `aggregation.lora: naive` or `ffa` with it"
        )


def _check_peft_method(config: ExperimentConfig) -> None:
    """What only LoRA supports: the LoRA aggregation modes, and DP-SGD's per-example gradients through Opacus."""
    method, mode = config.peft.method, config.aggregation.lora
    if mode != "naive" and method != "lora":
        why = "the DoRA magnitude normalises W + B A, so " if method == "dora" else ""
        raise FedlmError(
            f"`aggregation.lora: {mode}` needs `peft.method: lora`, got {method!r}: {why}exact re-factorises the mean "
            "of the products B A and ffa freezes A, both for plain LoRA factors only; "
            "use `aggregation.lora: naive` (plain per-tensor averaging) for other methods"
        )
    if config.privacy.sample_dp is not None and method != "lora":
        raise FedlmError(
            f"`privacy.sample_dp` needs `peft.method: lora`, got {method!r}: DP-SGD takes per-example gradients from "
            "Opacus, which are exact for LoRA's nn.Linear factors only (not for DoRA's norm, IA3's scaling vectors, "
            "the soft prompt shared across a batch, or every layer of the full model); use `peft.method: lora` or "
            "client-level DP (`privacy.client_dp`)"
        )


def _check_attack(config: ExperimentConfig) -> None:
    """The attack's parameters, and, where the federation size is known at load, the attacker arithmetic."""
    if config.attack.name is None:
        return
    from fedlm.attacks import build_attack_params
    from fedlm.attacks.harness import check_attack_arithmetic

    build_attack_params(config.attack.name, config.attack.params())
    if config.partition.num_clients is not None:
        check_attack_arithmetic(config, config.partition.num_clients)


def check_objective(config: ExperimentConfig) -> None:
    """Config-load checks: a known name, valid parameters, and settings the objective can honour. Features built
    on instruction records (canaries and the privacy audit, data-poisoning attacks) need ``objective: sft``."""
    objective = objective_of(config)
    objective.check_config(config)
    if objective.name == "sft":
        return
    if config.eval.audit is not None:
        raise FedlmError(
            f"`eval.audit` needs `objective: sft` (its canaries and membership scores are instruction answers), got "
            f"`objective: {objective.name}`; remove `eval.audit`"
        )
    if config.attack.name is not None:
        if attack_spec(config.attack.name).kind == "data":
            raise FedlmError(
                f"`attack.name: {config.attack.name}` rewrites instruction records and needs `objective: sft`, got "
                f"`objective: {objective.name}`; use an update attack (sign_flip, scaling, gaussian_noise, alie, ipm)"
            )
