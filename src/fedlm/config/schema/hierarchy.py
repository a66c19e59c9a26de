"""The ``hierarchy`` section: clients grouped under edge aggregators, each edge averaging its clients for
``edge_rounds`` edge rounds before the cloud aggregates the edges (HierFAVG, Liu, Zhang, Song & Letaief 2020,
"Client-Edge-Cloud Hierarchical Federated Learning", ICC; :mod:`fedlm.hierarchy`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from fedlm.config.schema.section import Section

#: The key of ``hierarchy.groups`` that asks for a seeded split into that many groups.
AUTO = "auto"


class HierarchyConfig(Section):
    """Edge groups and how many edge rounds each cloud round holds.

    ``groups`` is either a mapping ``edge name -> [client names]`` (every client in exactly one group, checked when
    the partition gives the names) or ``{auto: N}``: the clients split into N near-equal groups by a seeded shuffle
    (``edge_1`` .. ``edge_N``)."""

    groups: dict[str, list[str] | int] = Field(description="edge -> its client names, or {auto: N} for a seeded split into N edges")
    edge_rounds: int = Field(1, ge=1, description="kappa_2 of HierFAVG: edge aggregations per cloud aggregation")

    @field_validator("groups")
    @classmethod
    def _groups_shape(cls, groups: dict[str, Any]) -> dict[str, Any]:
        if not groups:
            raise ValueError("`hierarchy.groups` is empty: give `{auto: N}` or a mapping edge -> [client names]")
        if AUTO in groups:
            count = groups[AUTO]
            if len(groups) != 1 or isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError("`hierarchy.groups: {auto: N}` takes one positive integer N and no other key (or list the groups by name)")
            return groups
        seen: dict[str, str] = {}
        for edge, members in groups.items():
            if not isinstance(members, list) or not members:
                raise ValueError(f"`hierarchy.groups.{edge}` must be a non-empty list of client names")
            for client in members:
                if client in seen:
                    raise ValueError(f"client {client!r} is in both `hierarchy.groups.{seen[client]}` and `hierarchy.groups.{edge}`: put it in one")
                seen[client] = edge
        return groups

    def auto_groups(self) -> int | None:
        """N of ``{auto: N}``, or None when the groups are listed by name."""
        count = self.groups.get(AUTO)
        return count if isinstance(count, int) else None
