"""Which edge aggregator each client belongs to: the groups listed in ``hierarchy.groups``, or ``{auto: N}``, a seeded
split of the clients into N near-equal groups."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlm.config.schema.hierarchy import HierarchyConfig
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed, torch_generator


def auto_groups(client_names: Sequence[str], count: int, seed: int) -> dict[str, list[str]]:
    """``edge_1`` .. ``edge_<count>``: the clients shuffled by a generator seeded from ``seed`` and dealt round-robin
    (group sizes differ by at most one); each group lists its clients in federation order."""
    if count > len(client_names):
        raise FedlmError(
            f"`hierarchy.groups: {{auto: {count}}}` asks for more edges than the {len(client_names)} clients; use at most {len(client_names)}"
        )
    order = torch.randperm(len(client_names), generator=torch_generator(derive_seed(seed, "hierarchy-groups"))).tolist()
    members = [sorted(order[g::count]) for g in range(count)]
    return {f"edge_{g + 1}": [client_names[i] for i in idx] for g, idx in enumerate(members)}


def resolve_groups(section: HierarchyConfig, client_names: Sequence[str], seed: int) -> dict[str, list[str]]:
    """Edge name -> its clients (federation order); listed groups must cover every client exactly once."""
    count = section.auto_groups()
    if count is not None:
        return auto_groups(client_names, count, seed)
    listed = {edge: [str(c) for c in members] for edge, members in section.groups.items() if isinstance(members, list)}
    known = set(client_names)
    for edge, members in listed.items():
        unknown = [c for c in members if c not in known]
        if unknown:
            raise FedlmError(
                f"`hierarchy.groups.{edge}` names {', '.join(map(repr, unknown))}, not a client of the partition "
                f"(clients: {', '.join(client_names)}); fix the names"
            )
    grouped = {c for members in listed.values() for c in members}
    missing = [c for c in client_names if c not in grouped]
    if missing:
        raise FedlmError(
            f"clients {', '.join(map(repr, missing))} are in no group of `hierarchy.groups`; add each to one edge (or use `{{auto: N}}`)"
        )
    position = {c: i for i, c in enumerate(client_names)}
    return {edge: sorted(members, key=position.__getitem__) for edge, members in listed.items()}


def edge_of(groups: dict[str, list[str]]) -> dict[str, str]:
    """Client -> its edge."""
    return {client: edge for edge, members in groups.items() for client in members}
