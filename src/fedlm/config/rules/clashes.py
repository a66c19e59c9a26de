"""What several concerns' rules share: "this concern runs in the in-process simulation only" and "this concern
cannot run with these other settings" (the settings named in order, so that a message names the first one on)."""

from __future__ import annotations

from collections.abc import Mapping

from fedlm.config.rules.setting import Setting
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError


def simulation_only(s: Setting, active: bool, message: str) -> None:
    """Refuse with ``message`` when a concern is ``active`` outside the in-process simulation: another
    ``federation.runtime``, or ``partition.method: node_local`` (the data on SuperNodes)."""
    c = s.config
    if active and (c.federation.runtime != "simulation" or c.partition.method == "node_local"):
        raise FedlmError(message)


def settings_on(settings: Mapping[str, bool]) -> list[str]:
    """The names of ``settings`` (name -> whether the config uses it) that are on, in their order."""
    return [name for name, on in settings.items() if on]


def round_changers(c: ExperimentConfig, but: str) -> dict[str, bool]:
    """Whether each concern that changes how a round's updates are built or aggregated is used, leaving out
    ``but`` (the concern asking)."""
    used = {
        "systems": c.systems is not None,
        "hierarchy": c.hierarchy is not None,
        "continual": c.continual is not None,
        "offsite": c.offsite is not None,
        "teacher.mode": c.teacher.mode is not None,
        "contribution.methods": c.contribution.enabled,
    }
    return {name: on for name, on in used.items() if name != but}
