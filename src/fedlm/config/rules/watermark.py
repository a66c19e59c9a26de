"""Rules on the ownership watermark: where it runs and what it cannot be combined with."""

from __future__ import annotations

from fedlm.config.rules.clashes import round_changers, settings_on
from fedlm.config.rules.setting import Setting
from fedlm.core.errors import FedlmError


def watermark_runs_in_the_simulation(s: Setting) -> None:
    """The server trains the marks on its own copy of the model in the round; it is built and tested in the
    in-process simulation only (not yet with a Flower ServerApp)."""
    c = s.config
    if c.watermark.enabled and c.federation.runtime != "simulation":
        raise FedlmError(
            f"`watermark` is built for the in-process simulation only, not `federation.runtime: {c.federation.runtime}`; "
            "use `federation.runtime: simulation` or remove `watermark`"
        )


def watermark_fits_the_training(s: Setting) -> None:
    """Marks change the global adapter on the server: FedKSeed's clients rebuild the model from seeds and would
    never see it; a personalization method keeps other adapters on the model the marks train on; compressed
    downlink keeps one replica that all clients share, which per-client copies would break."""
    c, w = s.config, s.config.watermark
    if not w.enabled:
        return
    if c.federation.algorithm == "fedkseed":
        raise FedlmError(
            "`watermark` trains the global adapter on the server; `federation.algorithm: fedkseed` clients rebuild it from "
            "seeds and would never receive the mark: use another algorithm or remove `watermark`"
        )
    if c.personalization.method is not None:
        raise FedlmError(
            f"`watermark` is not built with `personalization.method: {c.personalization.method}` yet (its personal adapters "
            "share the model the marks train on); remove one of them"
        )
    if w.per_client and c.compression.downlink is not None:
        raise FedlmError(
            "`watermark.per_client` sends every client its own copy; `compression.downlink` sends one compressed replica to all: remove one of them"
        )


def watermark_alone_with_new_rounds(s: Setting) -> None:
    """The mark wraps the synchronous round's aggregation step and task builder; the round variants and the
    concerns that re-aggregate or re-route updates around them are not combined with it yet."""
    c = s.config
    if not c.watermark.enabled:
        return
    found = settings_on(round_changers(c, but="watermark"))
    if found:
        raise FedlmError(
            f"`watermark` is not combined with `{found[0]}` yet (both change how a round's updates are built or aggregated); remove one of them"
        )
