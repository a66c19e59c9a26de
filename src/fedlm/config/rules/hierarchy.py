"""Rules on hierarchical aggregation (``hierarchy``, HierFAVG): where it runs, and what an edge that averages its
clients' updates before the cloud sees them can and cannot honour."""

from __future__ import annotations

from fedlm.aggregation.lora.mode import LORA_MODES
from fedlm.config.rules.clashes import round_changers, settings_on, simulation_only
from fedlm.config.rules.setting import Setting
from fedlm.core.errors import FedlmError
from fedlm.hierarchy.groups import resolve_groups

# ------------------------------------------------------------------------------------------ hierarchical aggregation


def hierarchy_runs_in_the_simulation(s: Setting) -> None:
    """The edge tier is built in the in-process simulation's round; over Flower the SuperLink talks to the
    clients directly and no edge aggregator exists between them."""
    c = s.config
    simulation_only(
        s,
        c.hierarchy is not None,
        f"`hierarchy` (edge aggregators) is built for `federation.runtime: simulation` only, got `{c.federation.runtime}`"
        f"{' with `partition.method: node_local`' if c.partition.method == 'node_local' else ''}: Flower has no edge tier "
        "between the SuperLink and the SuperNodes; use the simulation or remove `hierarchy`",
    )


def hierarchy_fits_the_aggregation(s: Setting) -> None:
    """An edge averages its clients' updates (FedAvg) and sends one model change up: an aggregator that needs each
    client's extras (SCAFFOLD), a LoRA mode that aggregates products rather than factors, heterogeneous client ranks
    and FedKSeed's seed lists have no meaning for an edge's averaged change."""
    c = s.config
    if c.hierarchy is None:
        return
    if s.aggregator.uploads_extras is not None:
        raise FedlmError(
            f"`aggregation.name: {c.aggregation.name}` uploads {s.aggregator.uploads_extras}, which an edge aggregator of "
            "`hierarchy` does not forward to the cloud; choose an aggregator without client extras"
        )
    if not LORA_MODES.get(c.aggregation.lora).factor_space:
        raise FedlmError(
            f"`aggregation.lora: {c.aggregation.lora}` aggregates the products B A, so an edge's averaged factors are not its "
            "clients' model change; with `hierarchy` use `aggregation.lora: naive`, `ffa` or `rolora`"
        )
    if c.peft.client_ranks is not None:
        raise FedlmError(
            "`peft.client_ranks` with `hierarchy`: an edge's mean of a rank component would enter the cloud mean with the "
            "edge's whole weight even where none of its clients trains it; remove one of them"
        )
    if c.federation.algorithm != "gradient":
        raise FedlmError(
            f"`federation.algorithm: {c.federation.algorithm}` uploads seed lists, not model changes an edge can average; remove `hierarchy`"
        )


def hierarchy_without_client_wrappers(s: Setting) -> None:
    """Client DP and SecAgg+ protect one sum of client updates at the server, compression encodes what a client
    sends the server, attacks and the audit act on the server's view of each client, personalization keeps client
    state across single rounds, and the communication budget counts one tier: none is defined for an edge tier."""
    c = s.config
    if c.hierarchy is None:
        return
    used = {
        "privacy.client_dp": c.privacy.client_dp is not None,
        "privacy.sample_dp": c.privacy.sample_dp is not None,
        "privacy.secure_aggregation": c.privacy.secure_aggregation is not None,
        "compression.uplink": c.compression.uplink is not None,
        "compression.downlink": c.compression.downlink is not None,
        "attack": c.attack.name is not None,
        "eval.audit": c.eval.audit is not None,
        "personalization": c.personalization.method is not None,
        "federation.max_mib": c.federation.max_mib is not None,
        **round_changers(c, but="hierarchy"),
    }
    clash = settings_on(used)
    if clash:
        raise FedlmError(
            f"`{clash[0]}` is not built for `hierarchy` (edge aggregators) yet: its accounting or messages assume clients talk "
            f"to the server directly; remove `{clash[0]}` or `hierarchy`"
        )


def hierarchy_groups_fit_clients(s: Setting) -> None:
    """Every client belongs to exactly one edge (listed groups name real clients; ``{auto: N}`` has N <= clients),
    and a cloud round needs at least ``federation.min_clients`` edge updates, so there must be that many edges."""
    c = s.config
    if c.hierarchy is None:
        return
    auto = c.hierarchy.auto_groups()
    edges = auto if auto is not None else len(c.hierarchy.groups)
    if c.federation.min_clients > edges:
        raise FedlmError(
            f"`federation.min_clients` ({c.federation.min_clients}) counts edge updates under `hierarchy`, but there are only "
            f"{edges} edges in `hierarchy.groups`; lower it to at most {edges}"
        )
    if s.client_names:
        resolve_groups(c.hierarchy, s.client_names, c.seed)
    elif auto is not None and s.num_clients is not None and auto > s.num_clients:
        raise FedlmError(f"`hierarchy.groups: {{auto: {auto}}}` asks for more edges than the {s.num_clients} clients; use at most {s.num_clients}")
