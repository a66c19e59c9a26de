"""Rules on learning from a black-box teacher (``teacher``): where it is wired and what it trains."""

from __future__ import annotations

import os

from fedlm.config.rules.clashes import settings_on, simulation_only
from fedlm.config.rules.setting import Setting
from fedlm.core.errors import FedlmError


def teacher_runs_in_the_simulation(s: Setting) -> None:
    """The teacher's answers join a client's data inside the in-process simulation's client runtime; a SuperNode's
    ClientApp (Flower, its Ray engine, ``node_local`` data) does not call a teacher yet."""
    c = s.config
    simulation_only(
        s,
        c.teacher.mode is not None,
        f"`teacher.mode: {c.teacher.mode}` is wired in the in-process simulation only; `federation.runtime: {c.federation.runtime}` "
        f"(partition {c.partition.method}) does not call a teacher on its nodes yet: use `federation.runtime: simulation` "
        "and a partition other than node_local, or remove `teacher`",
    )


def teacher_fits_the_training(s: Setting) -> None:
    """The teacher answers prompts, so it teaches instruction tuning (``objective: sft``) by the plain gradient trainer:
    its mixed loss is not the per-example loss of ``privacy.sample_dp``'s DP-SGD, nor a zeroth-order (fedkseed),
    data-parallel or personalized step, data attacks would rewrite the records it is asked about, and a continual stream changes a client's data every stage."""
    c = s.config
    mode = c.teacher.mode
    if mode is None:
        return
    clashes = {
        "objective.name": c.objective.name != "sft",
        "privacy.sample_dp": c.privacy.sample_dp is not None,
        "federation.algorithm: fedkseed": c.federation.algorithm == "fedkseed",
        "federation.client_processes > 1": c.federation.client_processes > 1,
        "personalization.method": c.personalization.method is not None,
        "attack": c.attack.name is not None,
        "continual": c.continual is not None,
    }
    found = settings_on(clashes)
    if found:
        raise FedlmError(
            f"`teacher.mode: {mode}` trains `objective: sft` by the plain local trainer and is not wired with {', '.join(f'`{f}`' for f in found)}; "
            "remove the teacher or those settings"
        )


def teacher_key_is_set(s: Setting) -> None:
    """A named API-key variable must exist, or every request would fail with 401 in the middle of the run."""
    t = s.config.teacher
    if t.mode is not None and t.api_key_env is not None and not os.environ.get(t.api_key_env):
        raise FedlmError(f"`teacher.api_key_env`: the environment variable {t.api_key_env} is not set; export it or remove `api_key_env`")
