"""Training objectives (``objective: sft | clm | dpo``), one module each, built by name.

``sft``: instruction tuning, loss on the answers; ``clm``: packed causal-LM loss on raw text (continued
pre-training); ``dpo``: Direct Preference Optimization against the adapter-disabled base model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlm.objectives.base import Objective, build_objective

if TYPE_CHECKING:
    from fedlm.config.schema import ExperimentConfig


def objective_of(config: ExperimentConfig) -> Objective:
    """The configured objective with its parameters."""
    return build_objective(config.objective.name, config.objective.params())


__all__ = ["Objective", "build_objective", "objective_of"]
