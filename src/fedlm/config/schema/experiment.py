"""The whole experiment config: one typed, validated pydantic model per YAML section.

Unknown keys and bad values are refused at load time with a message that names the field and the fix
(see :mod:`fedlm.config.io` for YAML loading, ``--set`` overrides and error formatting; the cross-section rules are
in :mod:`fedlm.config.rules`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from fedlm.config.schema.attack import AttackConfig
from fedlm.config.schema.compression import CompressionConfig
from fedlm.config.schema.continual import ContinualConfig
from fedlm.config.schema.contribution import ContributionConfig
from fedlm.config.schema.data import DataConfig, PartitionConfig
from fedlm.config.schema.evaluation import EvalConfig
from fedlm.config.schema.federation import AggregationConfig, FederationConfig, ObjectiveConfig
from fedlm.config.schema.hierarchy import HierarchyConfig
from fedlm.config.schema.inference import InferenceConfig
from fedlm.config.schema.model import ModelConfig, PeftConfig
from fedlm.config.schema.offsite import OffsiteConfig
from fedlm.config.schema.personalization import PersonalizationConfig
from fedlm.config.schema.privacy import PrivacyConfig
from fedlm.config.schema.section import Section
from fedlm.config.schema.systems import SystemsConfig
from fedlm.config.schema.teacher import TeacherConfig
from fedlm.config.schema.watermark import WatermarkConfig


class ExperimentConfig(Section):
    """One federated experiment. Each section validates itself; combinations of sections are judged by the rules of
    :mod:`fedlm.config.rules` (run by :func:`fedlm.config.io.validate_config`)."""

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
    personalization: PersonalizationConfig = Field(default_factory=PersonalizationConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    continual: ContinualConfig | None = Field(None, description="continual federated learning: data arriving over time")
    systems: SystemsConfig | None = None  # device profiles, the simulated clock, FedBuff (simulation only)
    offsite: OffsiteConfig | None = Field(None, description="offsite-tuning: clients train on a compressed emulator (None: off)")
    contribution: ContributionConfig = Field(default_factory=ContributionConfig)
    hierarchy: HierarchyConfig | None = None  # edge aggregators between the clients and the server (HierFAVG)
    watermark: WatermarkConfig = Field(default_factory=WatermarkConfig)

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value
