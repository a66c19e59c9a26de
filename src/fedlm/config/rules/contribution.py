"""Rules on contribution scores (``contribution``) and the sampling that uses them (``federation.sampling``)."""

from __future__ import annotations

from fedlm.config.rules.setting import SECAGG, Setting
from fedlm.contribution.shapley import MAX_EXACT_PLAYERS
from fedlm.core.errors import FedlmError

_HOW_TO_VALIDATE = (
    "give the server its own held-out examples, e.g. `contribution.validation: path/to/validation.jsonl` "
    "(a file, folder or embedded:<name>, read like `data.train`), or drop `contribution.methods`"
)


def contribution_needs_validation_set(s: Setting) -> None:
    """A coalition is priced by the validation loss of its aggregate, on examples only the server holds."""
    section = s.config.contribution
    if section.enabled and section.validation is None:
        raise FedlmError(f"`contribution.validation` is required for contribution scores ({', '.join(section.methods)}): {_HOW_TO_VALIDATE}")


def contribution_sampling_needs_scores(s: Setting) -> None:
    """``federation.sampling: contribution`` draws by the scores, so it needs them and a choice to make."""
    c = s.config
    if c.federation.sampling != "contribution":
        return
    if not c.contribution.enabled:
        raise FedlmError("`federation.sampling: contribution` needs contribution scores: set `contribution.methods` (e.g. [gtg])")
    if c.privacy.sample_dp is not None:
        raise FedlmError(
            "`federation.sampling: contribution` cannot be used with `privacy.sample_dp`: its accountant counts the rounds a client joins "
            "from the uniform sampling schedule"
        )
    if c.continual is not None or c.systems is not None:
        other, chooser = ("continual", "the stream's membership") if c.continual is not None else ("systems", "device availability")
        raise FedlmError(
            f"`federation.sampling: contribution` and `{other}` both choose a round's clients (scores vs {chooser}); "
            f"use `federation.sampling: uniform` with `{other}`"
        )
    k, n = c.federation.clients_per_round, s.num_clients
    if k is None or (n is not None and k >= n):
        raise FedlmError(
            "`federation.sampling: contribution` chooses among the clients, so `federation.clients_per_round` must be below the number of clients"
            + (f" ({n})" if n is not None else "")
        )


def contribution_sees_individual_updates(s: Setting) -> None:
    """Scores re-aggregate each client's own update, which secure aggregation hides, and which client DP's guarantee
    does not cover (a score is a release about one client's update)."""
    c = s.config
    if not c.contribution.enabled:
        return
    if c.privacy.secure_aggregation is not None:
        raise FedlmError(f"`contribution.methods` cannot be used with `{SECAGG}`: the server sees only the sum of the updates, not each client's")
    if c.privacy.client_dp is not None:
        raise FedlmError(
            "`contribution.methods` cannot be used with `privacy.client_dp`: a client's score is computed from its own un-noised update "
            "and released, outside the DP guarantee"
        )
    if c.federation.algorithm == "fedkseed":
        raise FedlmError("`contribution.methods` cannot be used with `federation.algorithm: fedkseed`: its rounds aggregate seed lists, not updates")


def contribution_prices_every_coalition(s: Setting) -> None:
    """Shapley values need the aggregate of every small coalition, down to one client, and nothing else."""
    c = s.config
    if not c.contribution.enabled:
        return
    agg = s.aggregator
    if agg.needs_server_update:
        raise FedlmError(
            f"`contribution.methods` cannot be used with `aggregation.name: {c.aggregation.name}`: "
            "it needs the server's own update of the round to aggregate, which a coalition's price does not retrain"
        )
    bound = agg.byzantine_bound
    if bound is not None and bound.assumed_param is not None and bound.margin > 0:
        raise FedlmError(
            f"`contribution.methods` cannot be used with `aggregation.name: {c.aggregation.name}`: "
            f"it refuses rounds of {bound.formula(1)} updates or fewer ({bound.source}), and Shapley values price coalitions of one"
        )


def exact_shapley_small_rounds(s: Setting) -> None:
    """Exact Shapley prices 2^n coalitions a round: the reference for small rounds only."""
    c = s.config
    k = s.per_round
    if "exact" in c.contribution.methods and k is not None and k > MAX_EXACT_PLAYERS:
        raise FedlmError(
            f"`contribution.methods: exact` enumerates 2^n coalitions and allows at most {MAX_EXACT_PLAYERS} clients a round, got {k}; "
            "use gtg (or set `federation.clients_per_round`)"
        )
