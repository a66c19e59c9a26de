"""The ``privacy`` section of the experiment config: client-level DP, sample-level DP-SGD, secure aggregation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedlm.config.schema.section import Section


class ClientDPConfig(Section):
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): clip each update, noise the sum.

    Give ``noise_multiplier`` or ``target_epsilon`` (the noise is then chosen at load so that epsilon after
    ``federation.rounds`` is at most the target).
    """

    noise_multiplier: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="z: noise std on the sum is z * clip")
    target_epsilon: float | None = Field(None, gt=0.0, allow_inf_nan=False, description="choose z for this epsilon after all rounds")
    clip: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="L2 bound of each client's update")
    mode: Literal["central", "distributed"] = "central"
    adaptive: bool = Field(False, description="adapt the clip to a quantile of update norms (Andrew et al. 2021)")
    target_quantile: float = Field(0.5, gt=0.0, lt=1.0)
    clip_lr: float = Field(0.2, gt=0.0, allow_inf_nan=False)
    count_noise_std: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="default: clients per round / 20")

    @model_validator(mode="after")
    def _one_noise_source(self) -> ClientDPConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of `privacy.client_dp.noise_multiplier` or `privacy.client_dp.target_epsilon`")
        return self


class SampleDPConfig(Section):
    """Sample-level DP-SGD inside each client's local training (Abadi et al. 2016): per-example gradients of the
    trainable (adapter) parameters clipped to ``max_grad_norm``, Gaussian noise ``noise_multiplier * max_grad_norm``
    added to their sum every step. Give ``noise_multiplier`` or ``target_epsilon`` (then solved at load so that every
    client's epsilon after all its steps is at most the target)."""

    noise_multiplier: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="sigma of DP-SGD")
    target_epsilon: float | None = Field(None, gt=0.0, allow_inf_nan=False, description="choose sigma for this epsilon")
    max_grad_norm: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="per-example gradient L2 bound")

    @model_validator(mode="after")
    def _one_noise_source(self) -> SampleDPConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of `privacy.sample_dp.noise_multiplier` or `privacy.sample_dp.target_epsilon`")
        return self


class SecureAggregationConfig(Section):
    """SecAgg+ (Bell et al. 2020) over each round's clients: the server learns only the sum of the updates.

    ``neighbours`` None masks every pair (SecAgg, Bonawitz et al. 2017); k < clients per round uses a random
    k-regular graph (SecAgg+). Each coordinate is clipped to [-clip_range, clip_range] and quantised to
    2^quantization_bits levels before masking; arithmetic is modulo 2^32.
    """

    threshold: int | None = Field(None, ge=2, description="shares needed to reconstruct; default: 2/3 of the neighbours, rounded up")
    neighbours: int | None = Field(None, ge=2, description="k of SecAgg+; None: all other clients of the round")
    clip_range: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="per-coordinate range before quantisation")
    quantization_bits: int = Field(20, ge=4, le=28, description="levels 2^bits over [-clip_range, clip_range]")
    max_weight: int = Field(1000, ge=1, description="FedAvg weight n_k / max_weight (capped at 1) travels in the sum")


class PrivacyConfig(Section):
    """Differential privacy and its accounting (epsilon at ``delta`` logged every round), and secure aggregation."""

    client_dp: ClientDPConfig | None = None
    sample_dp: SampleDPConfig | None = None
    secure_aggregation: SecureAggregationConfig | None = None
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="the delta of (epsilon, delta)-DP")
    accountant: Literal["rdp", "pld"] = "rdp"
