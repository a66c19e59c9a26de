"""Turning a run's flat round into a hierarchical one when the config has a ``hierarchy`` section."""

from __future__ import annotations

import dataclasses

from fedlm.config.schema import ExperimentConfig
from fedlm.federation.observers.traffic import TrafficMeter
from fedlm.federation.server import Round
from fedlm.hierarchy.groups import resolve_groups
from fedlm.hierarchy.round import HierarchicalRound


def hierarchical(round_: Round, config: ExperimentConfig) -> Round:
    """``round_`` itself without ``hierarchy``; else a :class:`HierarchicalRound` on its task builder, runtime,
    validator, aggregation step and observers (its traffic meter left out: the hierarchical round counts the bytes of
    each tier itself)."""
    section = config.hierarchy
    if section is None:
        return round_
    groups = resolve_groups(section, round_.client_names, config.seed)
    parts = {f.name: getattr(round_, f.name) for f in dataclasses.fields(Round)}
    parts["observers"] = [o for o in round_.observers if not isinstance(o, TrafficMeter)]
    return HierarchicalRound(**parts, groups=groups, edge_rounds=section.edge_rounds)
