"""The ``contribution`` section: per-round contribution scores of the clients against a server validation set."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedlm.config.schema.section import Section

ContributionMethod = Literal["gtg", "loo", "exact"]


class GtgConfig(Section):
    """GTG-Shapley's knobs (Liu et al. 2022, Algorithm 1)."""

    max_permutations: int = Field(50, ge=1, description="most Monte-Carlo permutations a round")
    truncation: float = Field(
        0.01, ge=0.0, lt=1.0, description="within-round truncation: stop a permutation once within this share of |v(N) - v({})| of v(N)"
    )
    round_truncation: float = Field(1e-6, ge=0.0, description="between-round truncation: a round moving the validation loss less scores 0")
    tolerance: float = Field(0.05, gt=0.0, description="stop once a cycle of n permutations moves the estimates by less (relative)")


class ContributionConfig(Section):
    """Contribution scores: ``methods`` (the first one drives ``federation.sampling: contribution``), the server's
    validation set, and the sampling's softmax temperature and floor."""

    methods: list[ContributionMethod] = Field(
        default_factory=list,
        description="[] (off) or any of gtg (GTG-Shapley), loo (leave-one-out), exact (Shapley by enumeration, <= 6 clients a round)",
    )
    validation: str | None = Field(None, description="the server's validation set: a file, folder or embedded:<name> (as data.train)")
    validation_examples: int | None = Field(64, ge=1, description="a seeded subsample of the validation set (None: all of it)")
    batch_size: int = Field(16, ge=1, description="validation batch size")
    temperature: float = Field(1.0, gt=0.0, description="federation.sampling: contribution: softmax temperature over cumulative scores")
    floor: float = Field(0.2, gt=0.0, le=1.0, description="federation.sampling: contribution: share of the probability spread evenly")
    gtg: GtgConfig = Field(default_factory=GtgConfig)

    @field_validator("methods")
    @classmethod
    def _once_each(cls, methods: list[str]) -> list[str]:
        repeated = sorted({m for m in methods if methods.count(m) > 1})
        if repeated:
            raise ValueError(f"names {', '.join(repeated)} more than once")
        return methods

    @property
    def enabled(self) -> bool:
        """Whether scores are computed."""
        return bool(self.methods)
