"""Rules on continual federated learning (``continual``): where it runs and what it is not combined with."""

from __future__ import annotations

from fedlm.config.rules.clashes import simulation_only
from fedlm.config.rules.setting import Setting
from fedlm.core.errors import FedlmError


def continual_runs_in_the_simulation(s: Setting) -> None:
    """The stream (which slices a client holds each round), the replay buffers and the EWC state are kept by the
    in-process simulation in ``RUN_DIR/clients/<name>/``; a SuperNode's ClientApp does not keep them yet."""
    c = s.config
    simulation_only(
        s,
        c.continual is not None,
        f"`continual` is built for the in-process simulation only: a SuperNode (or a Ray worker of `{c.federation.runtime}`) "
        "does not release slices or keep a replay buffer yet; use `federation.runtime: simulation` (and a partition other than "
        "node_local) or remove `continual`",
    )


def continual_fits_the_run(s: Setting) -> None:
    """What a continual run cannot be combined with, and why: each of these reads or changes the clients' data or
    training in a way the stream does not follow."""
    c = s.config
    cont = c.continual
    if cont is None:
        return
    refused = {
        "personalization.method": (
            c.personalization.method is not None,
            "personal training reads every slice of a client and shares clients/<name>/",
        ),
        "attack": (c.attack.name is not None, "attacks rewrite the clients' records before they are cut into slices"),
        "eval.audit.canaries": (c.eval.audit is not None and c.eval.audit.canaries > 0, "canaries are planted in records that are not sliced"),
        "objective: clm": (c.objective.name == "clm", "packed text blocks lose the record field that names their slice; use sft or dpo"),
        "federation.algorithm: fedkseed": (c.federation.algorithm == "fedkseed", "zeroth-order seed training has no trainer hooks for EWC"),
        "federation.client_processes > 1": (c.federation.client_processes > 1, "the workers would not see the round's slices or EWC"),
        "privacy.sample_dp": (
            c.privacy.sample_dp is not None,
            "replayed records are seen more often than the accountant assumes, and EWC's Fisher is not privatised",
        ),
    }
    for what, (bad, why) in refused.items():
        if bad:
            raise FedlmError(f"`continual` cannot run with `{what}`: {why}; remove one of them")
