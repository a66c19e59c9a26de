"""Building a run's compression from its config (the rules that refuse a bad combination: :mod:`fedlm.config.rules`)."""

from __future__ import annotations

from collections.abc import Mapping

from fedlm.aggregation.base import Aggregator
from fedlm.aggregation.lora.mode import LoraMode
from fedlm.compression.codec import Codec
from fedlm.compression.downlink import CompressedDownlink, DownlinkState
from fedlm.compression.fedkseed import candidate_seeds
from fedlm.compression.seed_training import SeedDownlink, SeedReplay, SeedwiseFedAvg, ZerothOrderTrainer
from fedlm.compression.state import WithCompressionState
from fedlm.compression.uplink import CompressedUplink
from fedlm.config.schema import ExperimentConfig
from fedlm.core.runtime import Runtime
from fedlm.core.update import TensorDict
from fedlm.federation.tasks import TaskBuilder
from fedlm.federation.trainer import ClientTrainer


def uplink_codec(config: ExperimentConfig) -> Codec | None:
    """The clients' encoder, or None when updates travel dense."""
    section = config.compression.uplink
    return Codec.from_config(section) if section is not None else None


def with_compression_state(aggregator: Aggregator, config: ExperimentConfig) -> Aggregator:
    """``aggregator`` with room for the clients' residuals (uplink error feedback) and the downlink replica in its
    checkpointed state; else ``aggregator`` itself."""
    codec = uplink_codec(config)
    needed = (codec is not None and codec.error_feedback) or config.compression.downlink is not None or _seed_downlink(config)
    return WithCompressionState(aggregator) if needed else aggregator


def round_aggregator(aggregator: Aggregator) -> Aggregator:
    """The aggregator the round runs on: the one inside :class:`WithCompressionState` (which only checkpoints see)."""
    return aggregator.inner if isinstance(aggregator, WithCompressionState) else aggregator


def task_builder(
    config: ExperimentConfig,
    aggregator: Aggregator,
    lora: LoraMode,
    ranks: Mapping[str, int | None],
    initial_state: TensorDict,
    clients_here: bool = True,
) -> TaskBuilder:
    """The round's task builder: with ``compression.downlink``, the one that broadcasts the compressed change and
    builds the tasks from the clients' replica (its state kept in ``aggregator``, a :class:`WithCompressionState`).
    Clients elsewhere (``clients_here`` False: Flower SuperNodes) keep their own replica, so the broadcast messages
    travel in their tasks (:mod:`fedlm.compression.catch_up`)."""
    section = config.compression.downlink
    inner = round_aggregator(aggregator)
    if _seed_downlink(config) and isinstance(aggregator, WithCompressionState):
        if aggregator.downlink is None:
            aggregator.downlink = DownlinkState({})
        aggregator.downlink.keep_messages = not clients_here
        return SeedDownlink(config, inner, lora, ranks, aggregator.downlink)
    if section is None or not isinstance(aggregator, WithCompressionState):
        return TaskBuilder(config, inner, lora, ranks)
    if aggregator.downlink is None:
        aggregator.downlink = DownlinkState(dict(initial_state))
    aggregator.downlink.keep_messages = not clients_here
    return CompressedDownlink(config, inner, lora, ranks, Codec.from_config(section), config.seed, aggregator.downlink)


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


def seed_trainer(trainer: ClientTrainer, config: ExperimentConfig) -> ClientTrainer:
    """``federation.algorithm: fedkseed``: the zeroth-order trainer on ``trainer``'s model; else ``trainer``."""
    fed = config.federation
    if fed.algorithm != "fedkseed":
        return trainer
    seeds = candidate_seeds(config.seed, fed.fedkseed.seeds)
    return ZerothOrderTrainer(trainer.model, trainer.pad_id, trainer.device, objective=trainer.objective, seeds=seeds, eps=fed.fedkseed.eps)


def seed_replay(runtime: Runtime, config: ExperimentConfig) -> SeedReplay | None:
    """``federation.algorithm: fedkseed``: ``runtime`` with the server's replay of the clients' pairs; else None."""
    if config.federation.algorithm != "fedkseed":
        return None
    return SeedReplay(runtime, candidate_seeds(config.seed, config.federation.fedkseed.seeds))


def _seed_downlink(config: ExperimentConfig) -> bool:
    fed = config.federation
    return fed.algorithm == "fedkseed" and fed.fedkseed.downlink == "seeds"


def seedwise_aggregation(config: ExperimentConfig, replay: SeedReplay | None, aggregator: Aggregator) -> SeedwiseFedAvg | None:
    """FedKSeed's seed-wise FedAvg step when the downlink is seeds (its sizes kept in ``aggregator``'s state); else None."""
    if replay is None or not _seed_downlink(config) or not isinstance(aggregator, WithCompressionState) or aggregator.downlink is None:
        return None
    return SeedwiseFedAvg(replay, config.federation.min_clients, aggregator.downlink)
