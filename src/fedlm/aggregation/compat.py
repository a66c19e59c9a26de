"""Config-load checks that need the aggregator registry: parameters in their domain, and combinations that work.

Called by :func:`fedlm.config_io.validate_config`, so a bad ``aggregation`` section fails before any model loads.
"""

from __future__ import annotations

from fedlm.aggregation.base import build_aggregator
from fedlm.config import ExperimentConfig
from fedlm.errors import FedlmError


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
    if agg.lora != "naive" and config.peft.method != "lora":
        raise FedlmError(
            f"`aggregation.lora: {agg.lora}` needs `peft.method: lora`, got {config.peft.method!r}; "
            "use `aggregation.lora: naive` (plain per-tensor averaging) for other methods"
        )
    if agg.lora == "exact" and aggregator.needs_stable_parameter_space:
        raise FedlmError(
            f"`aggregation.name: {agg.name}` keeps per-client state on the LoRA factors A and B across rounds, but "
            "`aggregation.lora: exact` re-factorises A and B by SVD every round, so that state would refer to "
            "factors that no longer exist; use `aggregation.lora: naive` or `ffa` with it"
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
