"""Rules on the federation's shape: clients, rounds and ranks at load, and once the partition names the clients."""

from __future__ import annotations

from fedlm.aggregation.lora.client_ranks import resolve_client_ranks
from fedlm.config.rules.setting import NODE_LOCAL, Setting
from fedlm.core.errors import FedlmError
from fedlm.privacy.canary_audit import audit_client

# ------------------------------------------------------------------------------------------ federation shape


def node_local_keeps_data_on_the_nodes(s: Setting) -> None:
    """``node_local``: the data is on the SuperNodes, so refuse what needs it in the simulation or on the server."""
    c = s.config
    if c.partition.method != "node_local":
        return
    if c.federation.runtime != "flower":
        raise FedlmError(
            f"`federation.runtime` must be flower {NODE_LOCAL}; to simulate, put the clients' data in one file "
            "with a client column and use `partition.method: by_field`"
        )
    if c.data.test is None:
        raise FedlmError(
            f"`data.test` is required {NODE_LOCAL}: the server evaluates on its own held-out set, e.g. `data.test: embedded:wordnet_defs/test`"
        )
    if c.attack.name is not None:
        raise FedlmError(
            f"`attack.name` cannot be used {NODE_LOCAL}: the attack harness rewrites clients' data or updates in "
            "the simulation; run attacks with a split of one dataset (`partition.method: by_field` or iid)"
        )
    if c.eval.audit is not None:
        raise FedlmError(f"`eval.audit` cannot be used {NODE_LOCAL}: the audit needs the members' training examples")
    if c.privacy.sample_dp is not None and c.privacy.sample_dp.target_epsilon is not None:
        raise FedlmError(
            f"`privacy.sample_dp.target_epsilon` cannot be solved {NODE_LOCAL}: it needs the smallest client's "
            "dataset size; give `privacy.sample_dp.noise_multiplier` (each client logs its own epsilon)"
        )


def clients_per_round_within_federation(s: Setting) -> None:
    """A round cannot sample more clients than the federation has."""
    n, k = s.num_clients, s.config.federation.clients_per_round
    if n is not None and k is not None and k > n:
        raise FedlmError(f"`federation.clients_per_round` must be <= `partition.num_clients` ({n}), got {k}")


def client_ranks_one_per_client(s: Setting) -> None:
    """A list of client ranks is read in client order, so it needs one entry per client."""
    ranks, n = s.config.peft.client_ranks, s.num_clients
    if isinstance(ranks, list) and n is not None and len(ranks) != n:
        raise FedlmError(f"`peft.client_ranks` has {len(ranks)} entries but `partition.num_clients` is {n}; give one rank per client")


def min_clients_within_round(s: Setting) -> None:
    """A round with fewer sampled clients than ``min_clients`` could never be aggregated."""
    fed = s.config.federation
    if fed.clients_per_round is not None and fed.min_clients > fed.clients_per_round:
        raise FedlmError(f"`federation.min_clients` ({fed.min_clients}) must be <= `federation.clients_per_round` ({fed.clients_per_round})")


# ------------------------------------------------------------------------------------------ the real federation


def clients_per_round_within_clients(s: Setting) -> None:
    """A round cannot sample more clients than the partition produced."""
    n, k = len(s.client_names), s.config.federation.clients_per_round
    if k is not None and k > n:
        raise FedlmError(f"`federation.clients_per_round` must be <= the number of clients ({n}), got {k}")


def client_ranks_fit_clients(s: Setting) -> None:
    """``peft.client_ranks`` must name (or list, in order) the partition's clients."""
    resolve_client_ranks(s.config.peft.client_ranks, s.client_names, s.config.peft.r)


def audit_client_exists(s: Setting) -> None:
    """``eval.audit.canary_client`` must be one of the partition's clients."""
    if s.config.eval.audit is not None:
        audit_client(s.config.eval.audit, s.client_names)


#: The rules judged once the partition gives the client names, in order.
