"""Building a run's compression from its config (the rules that refuse a bad combination: :mod:`fedlm.config.rules`)."""

from __future__ import annotations

from fedlm.aggregation.base import Aggregator
from fedlm.compression.codec import Codec
from fedlm.compression.state import WithCompressionState
from fedlm.compression.uplink import CompressedUplink
from fedlm.config.schema import ExperimentConfig
from fedlm.core.runtime import Runtime


def uplink_codec(config: ExperimentConfig) -> Codec | None:
    """The clients' encoder, or None when updates travel dense."""
    section = config.compression.uplink
    return Codec.from_config(section) if section is not None else None


def with_compression_state(aggregator: Aggregator, config: ExperimentConfig) -> Aggregator:
    """``aggregator`` with room for the clients' residuals in its checkpointed state when the uplink uses error
    feedback; else ``aggregator`` itself."""
    codec = uplink_codec(config)
    return WithCompressionState(aggregator) if codec is not None and codec.error_feedback else aggregator


def compressed_uplink(runtime: Runtime, config: ExperimentConfig, aggregator: Aggregator, clients_here: bool) -> CompressedUplink | None:
    """``runtime`` with the server's decoding, and the clients' encoding when they run in this process
    (``clients_here``: the simulation); None without uplink compression."""
    codec = uplink_codec(config)
    if codec is None:
        return None
    if not clients_here:
        return CompressedUplink(runtime, codec, config.seed)
    residuals = aggregator.residuals if isinstance(aggregator, WithCompressionState) else {}
    return CompressedUplink(runtime, codec, config.seed, residuals)
