"""The experiment config's schema: one pydantic model per YAML section (no rules that need other packages)."""

from fedlm.config.schema.privacy import ClientDPConfig, PrivacyConfig, SampleDPConfig, SecureAggregationConfig
from fedlm.config.schema.section import Section
from fedlm.config.schema.sections import (
    AggregationConfig,
    AttackConfig,
    AuditConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    FederationConfig,
    ModelConfig,
    ObjectiveConfig,
    PartitionConfig,
    PeftConfig,
)

__all__ = [
    "AggregationConfig", "AttackConfig", "AuditConfig", "ClientDPConfig", "DataConfig", "EvalConfig", "ExperimentConfig",
    "FederationConfig", "ModelConfig", "ObjectiveConfig", "PartitionConfig", "PeftConfig", "PrivacyConfig",
    "SampleDPConfig", "SecureAggregationConfig", "Section",
]
