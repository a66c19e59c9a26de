"""Training objectives (``objective: sft | clm | dpo``), one module each, built by name.

``sft``: instruction tuning, loss on the answers; ``clm``: packed causal-LM loss on raw text (continued
pre-training); ``dpo``: Direct Preference Optimization against the adapter-disabled base model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlm.errors import FedlmError
from fedlm.objectives.base import Objective, build_objective

if TYPE_CHECKING:
    from fedlm.config import ExperimentConfig


def objective_of(config: ExperimentConfig) -> Objective:
    """The configured objective with its parameters."""
    return build_objective(config.objective.name, config.objective.params())


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
        from fedlm.attacks import attack_spec  # noqa: PLC0415

        if attack_spec(config.attack.name).kind == "data":
            raise FedlmError(
                f"`attack.name: {config.attack.name}` rewrites instruction records and needs `objective: sft`, got "
                f"`objective: {objective.name}`; use an update attack (sign_flip, scaling, gaussian_noise, alie, ipm)"
            )


__all__ = ["Objective", "build_objective", "check_objective", "objective_of"]
