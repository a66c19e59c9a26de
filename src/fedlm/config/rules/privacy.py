"""Rules on differential privacy (client-level and DP-SGD) and secure aggregation."""

from __future__ import annotations

from fedlm.aggregation.base import Aggregator, aggregator_class, registered_aggregators
from fedlm.config.rules.setting import SECAGG, Setting
from fedlm.core.errors import FedlmError
from fedlm.privacy.client_dp import dp_compatible_aggregators, wrap_refusal
from fedlm.privacy.secagg.quantize import max_summands
from fedlm.privacy.secagg.threshold import share_holders, threshold
from fedlm.privacy.setup import wrap_with_dp

# ------------------------------------------------------------------------------------------ differential privacy


def client_dp_target_reachable(s: Setting) -> None:
    """``privacy.client_dp.target_epsilon`` is solved for a noise multiplier at load, so an unreachable target fails
    before any model loads (needs the number of clients for the sampling rate)."""
    _ = s.dp_account


def distributed_dp_needs_secure_aggregation(s: Setting) -> None:
    """Distributed DP splits the noise among the clients: private only when the server sees just the sum."""
    dp = s.config.privacy.client_dp
    if dp is not None and dp.mode == "distributed" and s.config.privacy.secure_aggregation is None:
        raise FedlmError(
            "`privacy.client_dp.mode: distributed` splits the noise among the clients and is private only when the "
            "server sees just the sum; set `privacy.secure_aggregation` too, or use `mode: central`"
        )


def client_dp_needs_only_the_sum(s: Setting) -> None:
    """Client DP hands the aggregator one noised sum: refuse an aggregator that declares it needs each update
    (``needs_individual_updates``, ``needs_server_update``) or uploads what DP does not protect (``uploads_extras``)."""
    if s.config.privacy.client_dp is None:
        return
    reason = wrap_refusal(s.aggregator)
    if reason is not None:
        raise FedlmError(
            f"`privacy.client_dp`: differential privacy cannot wrap `aggregation.name: {s.config.aggregation.name}`: "
            f"{reason}; use one of {', '.join(dp_compatible_aggregators())}, or remove `privacy.client_dp`"
        )


def client_dp_wrapper_settings(s: Setting) -> None:
    """The DP wrapper's own parameters (e.g. adaptive clipping's count noise) are checked by building it."""
    if s.config.privacy.client_dp is not None and s.num_clients is not None:
        wrap_with_dp(s.aggregator, s.config, s.num_clients, s.dp_account)


def sample_dp_covers_every_upload(s: Setting) -> None:
    """DP-SGD noises the local steps only: a client hook that uploads a plain gradient (SCAFFOLD option I's control
    variate at the server model) would leak past it."""
    if s.config.privacy.sample_dp is None:
        return
    if any(hook.needs_start_gradient for hook in s.aggregator.trainer_hooks()):
        raise FedlmError(
            f"`privacy.sample_dp` cannot run with `aggregation.name: {s.config.aggregation.name}` and "
            f"`aggregation.option: {getattr(s.aggregator.params, 'option', '?')}`: that control variate is the client's "
            "plain gradient at the server model (no per-example clipping, no noise) and is uploaded, bypassing DP-SGD; "
            "use `aggregation.option: II` (with `federation.optimizer: sgd`) or remove `privacy.sample_dp`"
        )


def sample_dp_needs_lora(s: Setting) -> None:
    """Opacus's per-example gradients are exact for LoRA's nn.Linear factors only."""
    method = s.config.peft.method
    if s.config.privacy.sample_dp is not None and method != "lora":
        raise FedlmError(
            f"`privacy.sample_dp` needs `peft.method: lora`, got {method!r}: DP-SGD takes per-example gradients from "
            "Opacus, which are exact for LoRA's nn.Linear factors only (not for DoRA's norm, IA3's scaling vectors, "
            "the soft prompt shared across a batch, or every layer of the full model); use `peft.method: lora` or "
            "client-level DP (`privacy.client_dp`)"
        )


# ------------------------------------------------------------------------------------------ secure aggregation


def _secagg_compatible_aggregators() -> list[str]:
    """Names of the registered aggregators that work on the sum of the updates alone."""
    return [name for name in registered_aggregators() if _needs_each_update(aggregator_class(name)) is None]


def _needs_each_update(agg: type[Aggregator] | Aggregator) -> str | None:
    """Why ``agg`` needs more than the sum of the updates (its declared capabilities), or None."""
    if agg.needs_individual_updates is not None:
        return agg.needs_individual_updates
    if agg.uploads_extras is not None:
        return f"it uploads {agg.uploads_extras} beside the delta, which the masked sum does not carry"
    if agg.needs_server_update:
        return "it compares each client's update with the server's own"
    return None


def secure_aggregation_needs_only_the_sum(s: Setting) -> None:
    """Under secure aggregation the server learns only the sum of the updates."""
    if s.config.privacy.secure_aggregation is None:
        return
    reason = _needs_each_update(s.aggregator)
    if reason is not None:
        raise FedlmError(
            f"`{SECAGG}` shows the server only the sum of the updates, but `aggregation.name: {s.config.aggregation.name}` "
            f"needs the individual ones: {reason}; use one of {', '.join(_secagg_compatible_aggregators())}"
        )


def secure_aggregation_lora_mode(s: Setting) -> None:
    """A masked sum of factors is no sum of products (``exact``), and ``naive``'s per-rank weights need every
    client's rank beside its update."""
    c = s.config
    if c.privacy.secure_aggregation is None:
        return
    if c.aggregation.lora == "exact":
        raise FedlmError(
            f"`{SECAGG}` sums what clients send, but `aggregation.lora: exact` needs each client's own "
            "product B_k A_k (a sum of factors is not a sum of products); use `aggregation.lora: naive` or `ffa`"
        )
    if c.peft.client_ranks is not None and c.aggregation.lora == "naive":
        raise FedlmError(
            f"`{SECAGG}` with `peft.client_ranks` needs `aggregation.lora: ffa`: naive's per-rank "
            "weighting needs every client's rank and example count beside its update"
        )


def secure_aggregation_without_adaptive_clipping(s: Setting) -> None:
    """Adaptive clipping needs each client's clipped bit, which would have to be summed securely too."""
    dp = s.config.privacy.client_dp
    if s.config.privacy.secure_aggregation is not None and dp is not None and dp.adaptive:
        raise FedlmError(
            f"`{SECAGG}` with `privacy.client_dp.adaptive: true` is not supported: the clipped count of "
            "each client would have to be summed securely too; set `adaptive: false`"
        )


def secure_aggregation_neighbours_even(s: Setting) -> None:
    """SecAgg+'s Harary graph puts k/2 neighbours on each side of a client."""
    sa = s.config.privacy.secure_aggregation
    if sa is not None and sa.neighbours is not None and sa.neighbours % 2:
        raise FedlmError(f"`{SECAGG}.neighbours` must be even (k/2 on each side of the SecAgg+ Harary graph), got {sa.neighbours}")


def secure_aggregation_threshold(s: Setting) -> None:
    """The threshold must let a round finish, stay within the share holders, and exceed half of them; the quantised
    sum must fit the 2^32 modulus (needs the number of clients)."""
    sa, per_round = s.config.privacy.secure_aggregation, s.per_round
    if sa is None or per_round is None:
        return
    holders = share_holders(sa, per_round)
    t = threshold(sa, per_round)
    if t > per_round:
        raise FedlmError(f"`{SECAGG}.threshold` {t} is above the clients per round ({per_round}); no round could finish")
    if t > holders:
        raise FedlmError(
            f"`{SECAGG}.threshold` {t} is above the {holders} holders of each client's shares "
            f"(its {holders - 1} neighbours and itself); lower it or raise `{SECAGG}.neighbours`"
        )
    if 2 * t <= holders:
        raise FedlmError(
            f"`{SECAGG}.threshold` {t} must be more than half of the {holders} share holders, or the server "
            "could rebuild both a client's self-mask and its mask key from two disjoint groups "
            f"(Bonawitz et al. 2017, Sec. 4); use at least {holders // 2 + 1}"
        )
    if per_round > max_summands(sa.quantization_bits):
        raise FedlmError(
            f"`{SECAGG}.quantization_bits` {sa.quantization_bits}: {per_round} clients x (2^{sa.quantization_bits} - 1) "
            f"overflows the 2^32 modulus; use at most {max_summands(sa.quantization_bits)} clients or fewer bits"
        )
