"""The experiment config's schema: one pydantic model per YAML section, one module per section or small group
(model+peft, data+partition, federation+aggregation+objective, attack, eval+audit, privacy, the whole experiment).
No rule here looks at two sections; those are :mod:`fedlm.config.rules`."""

from fedlm.config.schema.attack import AttackConfig
from fedlm.config.schema.contribution import ContributionConfig, GtgConfig
from fedlm.config.schema.data import DataConfig, PartitionConfig
from fedlm.config.schema.evaluation import AuditConfig, EvalConfig, HarnessConfig
from fedlm.config.schema.experiment import ExperimentConfig
from fedlm.config.schema.federation import AggregationConfig, FederationConfig, ObjectiveConfig
from fedlm.config.schema.model import ModelConfig, PeftConfig
from fedlm.config.schema.personalization import PersonalizationConfig
from fedlm.config.schema.privacy import ClientDPConfig, PrivacyConfig, SampleDPConfig, SecureAggregationConfig
from fedlm.config.schema.section import Section

__all__ = [
    "AggregationConfig",
    "AttackConfig",
    "AuditConfig",
    "ClientDPConfig",
    "ContributionConfig",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FederationConfig",
    "GtgConfig",
    "HarnessConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "PartitionConfig",
    "PeftConfig",
    "PersonalizationConfig",
    "PrivacyConfig",
    "SampleDPConfig",
    "SecureAggregationConfig",
    "Section",
]
