"""Rules on offsite-tuning (``offsite``): the layers must fit the model, and it runs where the emulator is wired."""

from __future__ import annotations

from fedlm.config.rules.clashes import settings_on
from fedlm.config.rules.setting import Setting
from fedlm.core.errors import FedlmError
from fedlm.offsite.layers import known_num_layers, plan_layers


def offsite_layers_fit_the_model(s: Setting) -> None:
    """The adapter layers must leave a middle and ``keep_ratio`` must keep some of it; judged here when the depth
    of ``model.name`` is known without loading it (the aliases), else when the model loads."""
    offsite, name = s.config.offsite, s.config.model.name
    depth = known_num_layers(name)
    if offsite is not None and depth is not None:
        plan_layers(depth, offsite.n_bottom, offsite.n_top, offsite.keep_ratio)


def offsite_runs_in_the_simulation(s: Setting) -> None:
    """Only the in-process simulation hands its clients the emulator: a SuperNode or Ray worker loads the model
    itself (the full one), and so would data-parallel client processes."""
    c = s.config
    if c.offsite is None:
        return
    if c.federation.runtime != "simulation" or c.partition.method == "node_local" or c.federation.client_processes > 1:
        raise FedlmError(
            f"`offsite` is built for the in-process simulation: with `federation.runtime: {c.federation.runtime}`, node_local data or "
            "`federation.client_processes` > 1 the clients would load the full model themselves; use `federation.runtime: simulation` "
            "with one process per client, or remove `offsite`"
        )


def offsite_fits_the_adapter(s: Setting) -> None:
    """The clients' adapter must sit on the bottom and top layers only (LoRA or DoRA, through peft's
    ``layers_to_transform``), on an unquantized base whose middle the server can distill, trained with gradients by
    the plain trainer (no personal state, no per-example DP-SGD, no zeroth-order seeds, no DPO reference model)."""
    c = s.config
    if c.offsite is None:
        return
    if c.peft.method not in ("lora", "dora"):
        raise FedlmError(f"`offsite` puts the adapter on the bottom and top layers only: needs `peft.method: lora` or `dora`, got {c.peft.method!r}")
    if c.model.quantization != "none":
        raise FedlmError(f"`offsite` distills the emulator's middle weights: not with `model.quantization: {c.model.quantization}`; use none")
    if c.objective.name not in ("sft", "clm"):
        raise FedlmError(f"`offsite` is wired for `objective: sft` or `clm`, got {c.objective.name!r}")
    unwired = settings_on(
        {
            "personalization.method": c.personalization.method is not None,
            "privacy.sample_dp": c.privacy.sample_dp is not None,
            "federation.algorithm: fedkseed": c.federation.algorithm == "fedkseed",
            "continual": c.continual is not None,
            "teacher.mode": c.teacher.mode is not None,
        }
    )
    if unwired:
        raise FedlmError(f"`offsite` is not wired with `{unwired[0]}` (its clients would train the full model); remove one of them")
