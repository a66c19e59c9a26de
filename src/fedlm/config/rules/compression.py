"""Rules on update compression and FedKSeed's seed-only training."""

from __future__ import annotations

from fedlm.aggregation.base import Aggregator
from fedlm.config.rules.setting import SECAGG, Setting
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError

# ------------------------------------------------------------------------------------------ update compression


def broadcast_downlink_fits_the_nodes(s: Setting) -> None:
    """Over Flower each node keeps its own full replica of the global model and advances it with the broadcast
    messages (``compression.downlink``, FedKSeed's seed lists); a client of a lower LoRA rank is sent the model cut
    to its rank, from which it could not keep the full replica."""
    c = s.config
    seeds = c.federation.algorithm == "fedkseed" and c.federation.fedkseed.downlink == "seeds"
    if c.federation.runtime == "simulation" or not c.peft.client_ranks or (c.compression.downlink is None and not seeds):
        return
    what = "`compression.downlink`" if c.compression.downlink is not None else "`federation.fedkseed.downlink: seeds`"
    raise FedlmError(
        f"{what} cannot run with `peft.client_ranks` over `federation.runtime: {c.federation.runtime}`: each node keeps the full "
        "replica of the global model, and a client of a lower rank only receives the model cut to its rank; remove one of them"
    )


def compression_downlink_error_feedback(s: Setting) -> None:
    """The downlink always carries the server's error feedback: ``error_feedback: false`` is refused."""
    down = s.config.compression.downlink
    if down is None:
        return
    if down.error_feedback is False:
        raise FedlmError(
            "`compression.downlink.error_feedback: false` is not an option: the server encodes the difference between "
            "the global model and the clients' replica, so what one round drops is sent in a later one; remove the key"
        )


def uplink_compression_not_under_secure_aggregation(s: Setting) -> None:
    """SecAgg+ sums every client's whole update on one integer grid in its field; neither codec fits that."""
    uplink = s.config.compression.uplink
    if uplink is None or s.config.privacy.secure_aggregation is None:
        return
    if uplink.method == "topk":
        why = (
            "each client keeps different coordinates, and the masked sum needs every client's full vector on the same "
            "coordinates (the indices would also tell the server where each client's update is large)"
        )
    else:
        why = (
            "each client's per-block scales differ, so its codes do not add up to the sum in the field; secure "
            f"aggregation already quantizes every coordinate into its field: set `{SECAGG}.quantization_bits` instead"
        )
    raise FedlmError(f"`compression.uplink.method: {uplink.method}` cannot run under `{SECAGG}`: {why}; remove `compression.uplink`")


def fedkseed_fits_the_run(s: Setting) -> None:
    """FedKSeed's clients take zeroth-order steps and upload (seed, scalar) pairs that the server replays: anything that
    needs a gradient, per-client hooks, each client's dense vector under masks, or a SuperNode trainer is refused."""
    config = s.config
    if config.federation.algorithm != "fedkseed":
        return
    prefix = "`federation.algorithm: fedkseed`"
    if config.privacy.sample_dp is not None:
        raise FedlmError(
            f"{prefix} cannot run with `privacy.sample_dp`: DP-SGD clips and noises per-example gradients, and a zeroth-order "
            "step has none (its one scalar per batch would need its own clipping and accounting, which fedlm does not do); "
            "use `privacy.client_dp` (the server clips and noises each replayed update) or the gradient algorithm"
        )
    if config.privacy.secure_aggregation is not None:
        raise FedlmError(f"{prefix} cannot run under `{SECAGG}`: the server must replay each client's own (seed, gradient) pairs")
    if config.compression.uplink is not None:
        raise FedlmError(f"{prefix} uploads a few bytes per step already; remove `compression.uplink`")
    if config.federation.client_processes > 1:
        raise FedlmError(f"{prefix} runs each client on one process; set `federation.client_processes: 1`")
    if config.peft.client_ranks:
        raise FedlmError(f"{prefix} perturbs every trainable component, so per-client LoRA ranks do not apply; remove `peft.client_ranks`")
    if config.aggregation.lora in ("fedex", "flora", "rolora"):
        raise FedlmError(
            f"{prefix} perturbs every trainable LoRA factor and replays plain deltas; `aggregation.lora: {config.aggregation.lora}` "
            "needs gradient steps on a frozen factor or a server residual the pairs do not carry: use `aggregation.lora: naive`"
        )
    agg = s.aggregator
    if agg.trainer_hooks() or agg.uploads_extras is not None:
        raise FedlmError(
            f"{prefix} runs no client-side hooks and uploads nothing but the pairs, but `aggregation.name: {config.aggregation.name}` "
            "needs them; use an aggregator that takes plain deltas (e.g. fedavg, fedadam, median)"
        )
    if config.federation.fedkseed.downlink == "seeds":
        _seed_downlink_fits(config, agg)


def _seed_downlink_fits(config: ExperimentConfig, agg: Aggregator) -> None:
    """The broadcast (seed, coefficient) lists are FedAvg's step on the clients' pairs: any other server step, noise,
    an altered update or a compressed replica would not be what the lists rebuild."""
    why = None
    if not agg.example_weighted_mean or config.aggregation.lora != "naive":
        why = (
            f"it is FedAvg's step (an example-weighted mean of the deltas) on plain factors, not `aggregation.name: "
            f"{config.aggregation.name}` with `aggregation.lora: {config.aggregation.lora}`"
        )
    elif config.privacy.client_dp is not None:
        why = "client DP's noise is not a combination of the seeds' perturbations"
    elif config.attack.name is not None:
        why = "an attack alters the replayed update, which the lists (built from the pairs) would not carry"
    elif config.compression.downlink is not None:
        why = "the lists rebuild the global model exactly; `compression.downlink` would compress it again"
    if why is not None:
        raise FedlmError(f"`federation.fedkseed.downlink: seeds` cannot run here: {why}; set `federation.fedkseed.downlink: dense`")
