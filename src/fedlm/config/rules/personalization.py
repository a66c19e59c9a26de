"""Rules on personalization methods: where they run and what adapter they need."""

from __future__ import annotations

from fedlm.config.rules.setting import Setting
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError

# ------------------------------------------------------------------------------------------ personalization


def personalization_runs_in_the_simulation(s: Setting) -> None:
    """A client's personal state lives with its client: in ``RUN_DIR/clients/<name>/`` of the in-process simulation,
    on its SuperNode (``--state-dir``) over Flower's Deployment Engine. Not built: the Ray ``flower-simulation``
    engine (its workers serve any client and keep no node of their own) and ``node_local`` partitions (a node there
    has no test share of its own for the personal evaluation)."""
    c = s.config
    method = c.personalization.method
    if method is None:
        return
    if c.federation.runtime == "flower-simulation":
        raise FedlmError(
            f"`personalization.method: {method}` keeps each client's personal state with its client; `federation.runtime: "
            "flower-simulation` runs clients in Ray workers that serve any client and have no state of their own: use "
            "`federation.runtime: simulation` or `flower` (SuperNodes with --state-dir), or remove `personalization`"
        )
    if c.partition.method == "node_local":
        raise FedlmError(
            f"`personalization.method: {method}` with `partition.method: node_local` is not built: a node there holds no test "
            "share for the personal evaluation; use a partition the nodes compute (iid, dirichlet, ...) or remove `personalization`"
        )


def personalization_fits_the_adapter(s: Setting) -> None:
    """Personal models are peft adapters (loadable with ``PeftModel.from_pretrained``); FedSA-LoRA and FedDPA work
    on LoRA factors; FedSA-LoRA averages A factor by factor (``aggregation.lora: naive``), the one thing it shares."""
    c = s.config
    method = c.personalization.method
    if method is None:
        return
    if c.peft.method == "full":
        raise FedlmError(f"`personalization.method: {method}` keeps a personal peft adapter per client; `peft.method: full` has none: use lora")
    if method in ("fedsa", "dual") and c.peft.method != "lora":
        raise FedlmError(f"`personalization.method: {method}` needs `peft.method: lora` (it works on LoRA's A and B), got {c.peft.method!r}")
    if method == "fedsa" and c.aggregation.lora != "naive":
        raise FedlmError(
            f"`personalization.method: fedsa` shares and averages LoRA A alone; `aggregation.lora: {c.aggregation.lora}` "
            "does not (exact averages B A, ffa freezes A): use `aggregation.lora: naive`"
        )
    if c.federation.algorithm == "fedkseed":
        raise FedlmError(
            f"`personalization.method: {method}` trains personal state with gradients beside the global update; "
            "`federation.algorithm: fedkseed` trains by zeroth-order steps only: use one of them"
        )
    if method == "prompt":
        _prompt_fits(c)


def _prompt_fits(c: ExperimentConfig) -> None:
    """A soft prompt goes in front of token inputs (sft, clm) of the one in-process model, beside a weight adapter."""
    if c.peft.method not in ("lora", "dora", "ia3"):
        raise FedlmError(
            f"`personalization.method: prompt` adds a soft prompt beside a weight adapter; `peft.method: {c.peft.method}` is not one: use lora"
        )
    if c.objective.name not in ("sft", "clm"):
        raise FedlmError(f"`personalization.method: prompt` needs `objective: sft` or `clm`, got {c.objective.name!r}")
    if c.federation.client_processes > 1 or c.privacy.sample_dp is not None:
        raise FedlmError(
            "`personalization.method: prompt` runs its soft prompt in the one in-process model: not with "
            "`federation.client_processes` > 1 nor `privacy.sample_dp` (per-example gradients); remove those"
        )
