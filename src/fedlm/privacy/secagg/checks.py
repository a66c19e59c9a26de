"""Config-load checks of ``privacy.secure_aggregation``: what can be combined with a server that sees only a sum."""

from __future__ import annotations

import math

from fedlm.aggregation.base import Aggregator
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.privacy.secagg.quantize import max_summands

SECTION = "privacy.secure_aggregation"


def share_holders(config: ExperimentConfig, clients_per_round: int) -> int:
    """How many clients hold shares of each client's secrets: its neighbours and itself."""
    k = config.privacy.secure_aggregation.neighbours if config.privacy.secure_aggregation else None
    return min(k if k is not None else clients_per_round - 1, clients_per_round - 1) + 1


def threshold(config: ExperimentConfig, clients_per_round: int) -> int:
    """The configured threshold, else two thirds of the share holders rounded up (at least 2)."""
    sa = config.privacy.secure_aggregation
    assert sa is not None  # noqa: S101 - callers check
    return sa.threshold if sa.threshold is not None else max(2, math.ceil(2 * share_holders(config, clients_per_round) / 3))


def check_secure_aggregation(config: ExperimentConfig, aggregator: Aggregator, num_clients: int | None) -> None:
    """Raise :class:`FedlmError` naming the fields when secure aggregation cannot work with the rest of the config."""
    sa = config.privacy.secure_aggregation
    if sa is None:
        return
    from fedlm.privacy.client_dp import NEEDS_INDIVIDUAL_UPDATES

    name = config.aggregation.name
    if name in NEEDS_INDIVIDUAL_UPDATES or aggregator.needs_server_update:
        reason = NEEDS_INDIVIDUAL_UPDATES.get(name, "it compares each client's update with the server's own")
        reason = reason.replace("under DP it receives one noised sum", "under secure aggregation the server learns only the sum")
        raise FedlmError(f"`{SECTION}` shows the server only the sum of the updates, but `aggregation.name: {name}` needs "
                         f"the individual ones: {reason}; use fedavg, fedavgm, fedprox, fedadagrad, fedadam or fedyogi")
    if config.aggregation.lora == "exact":
        raise FedlmError(f"`{SECTION}` sums what clients send, but `aggregation.lora: exact` needs each client's own "
                         "product B_k A_k (a sum of factors is not a sum of products); use `aggregation.lora: naive` or `ffa`")
    if config.peft.client_ranks is not None and config.aggregation.lora == "naive":
        raise FedlmError(f"`{SECTION}` with `peft.client_ranks` needs `aggregation.lora: ffa`: naive's per-rank "
                         "weighting needs every client's rank and example count beside its update")
    dp = config.privacy.client_dp
    if dp is not None and dp.adaptive:
        raise FedlmError(f"`{SECTION}` with `privacy.client_dp.adaptive: true` is not supported: the clipped count of "
                         "each client would have to be summed securely too; set `adaptive: false`")
    if sa.neighbours is not None and sa.neighbours % 2:
        raise FedlmError(f"`{SECTION}.neighbours` must be even (k/2 on each side of the SecAgg+ Harary graph), got {sa.neighbours}")
    if num_clients is None:
        return
    per_round = config.federation.clients_per_round or num_clients
    holders = share_holders(config, per_round)
    t = threshold(config, per_round)
    if t > per_round:
        raise FedlmError(f"`{SECTION}.threshold` {t} is above the clients per round ({per_round}); no round could finish")
    if t > holders:
        raise FedlmError(f"`{SECTION}.threshold` {t} is above the {holders} holders of each client's shares "
                         f"(its {holders - 1} neighbours and itself); lower it or raise `{SECTION}.neighbours`")
    if 2 * t <= holders:
        raise FedlmError(f"`{SECTION}.threshold` {t} must be more than half of the {holders} share holders, or the server "
                         "could rebuild both a client's self-mask and its mask key from two disjoint groups "
                         f"(Bonawitz et al. 2017, Sec. 4); use at least {holders // 2 + 1}")
    if per_round > max_summands(sa.quantization_bits):
        raise FedlmError(f"`{SECTION}.quantization_bits` {sa.quantization_bits}: {per_round} clients x (2^{sa.quantization_bits} - 1) "
                         f"overflows the 2^32 modulus; use at most {max_summands(sa.quantization_bits)} clients or fewer bits")
