"""What a session builds for ``offsite`` (offsite-tuning, Xiao et al. 2023) and what it attaches to the round.

- :func:`adapter_layers`: the layers the adapter may sit on (bottom and top), before it is attached;
- :func:`build_offsite`: the emulator (distilled on the public text), checked to take the full model's adapter;
- :class:`Offsite`: the clients train its ``emulator``; it gives the round observers (the emulator traffic, the
  plug-in check, FedBiOT's alignment) and the evaluation probe (the emulator's loss, the plug-in gap).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedlm.config.schema import ExperimentConfig
from fedlm.config.schema.offsite import OffsiteConfig
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.seeding import derive_seed
from fedlm.core.update import TensorDict
from fedlm.evaluation.evaluator import GLOBAL_SPLIT, Evaluator
from fedlm.models.adapters import trainable_state
from fedlm.offsite.distill import DistillResult, PublicText, distill_middle, middle_gap
from fedlm.offsite.emulator import base_weights, build_emulator, layer_weights, num_layers_of, weight_bytes
from fedlm.offsite.fedbiot import EmulatorAlignment
from fedlm.offsite.layers import LayerPlan, plan_layers
from fedlm.offsite.plugin import check_plug_in
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole

EMULATOR_SPLIT = "emulator_test"
_HELD_OUT_BATCHES = 2  # public batches on which the middle's distance to the full model is reported


def layer_plan(config: OffsiteConfig, model: torch.nn.Module) -> LayerPlan:
    """The emulator's layers for ``model`` (its depth read from the model itself)."""
    return plan_layers(num_layers_of(model), config.n_bottom, config.n_top, config.keep_ratio)


def adapter_layers(config: ExperimentConfig, model: torch.nn.Module) -> list[int] | None:
    """Under ``offsite``, the layers the adapter sits on (bottom and top); None (every layer) otherwise."""
    return layer_plan(config.offsite, model).adapter_layers if config.offsite is not None else None


@dataclass
class Offsite:
    """The emulator beside the full model, and what the run reports about it."""

    config: OffsiteConfig
    plan: LayerPlan
    emulator: PeftModel | PreTrainedModel
    full: PeftModel | PreTrainedModel
    public: PublicText
    seed: int
    device: torch.device
    summary: dict[str, Any] = field(default_factory=dict)  # the round-0 `offsite` record
    version: int = 0  # bumped by each alignment: a client holding an older emulator gets its middle again

    def observers(self, log: MetricsLog) -> list[RoundObserver]:
        """The round observers: emulator traffic and plug-in check, then FedBiOT's alignment when configured."""
        observers: list[RoundObserver] = [EmulatorTraffic(self, log)]
        if self.config.align_steps > 0:
            observers.append(
                EmulatorAlignment(
                    self.emulator,
                    self.full,
                    self.plan,
                    self.public,
                    self.config.align_steps,
                    self.config.distill_lr,
                    self.seed,
                    self.device,
                    self.bump,
                )
            )
        return observers

    def bump(self) -> None:
        """The emulator changed (FedBiOT's alignment)."""
        self.version += 1

    def probe(self, evaluator: Evaluator, log: MetricsLog) -> EmulatorProbe:
        """The emulator's evaluation beside the full model's (loss only: no generation)."""
        return EmulatorProbe(replace(evaluator, model=self.emulator, config=evaluator.config.model_copy(update={"generate": False})), log)


def build_offsite(
    config: ExperimentConfig, model: PeftModel | PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device, console: RunConsole
) -> Offsite:
    """The emulator of ``model`` (its adapter already on the bottom and top layers): uniform layer drop, then
    ``offsite.emulator_distill_steps`` of distillation on ``offsite.public_data``; refused if its adapter does not
    plug into ``model``."""
    settings = config.offsite
    if settings is None:
        raise ValueError("build_offsite needs an `offsite` section")
    plan = layer_plan(settings, model)
    emulator = build_emulator(model, plan)
    check_plug_in(model, trainable_state(emulator))  # the same names and shapes, by construction
    public = PublicText.read(settings.public_data, tokenizer, config.data.max_length, settings.distill_batch_size)
    seed = derive_seed(config.seed, "offsite")
    held_out = public.batches(_HELD_OUT_BATCHES, derive_seed(seed, "held-out"))
    before = middle_gap(emulator, model, len(plan.top), held_out, device)
    result = DistillResult(float("nan"), float("nan"), 0)
    if settings.emulator_distill_steps > 0:
        batches = public.batches(settings.emulator_distill_steps, derive_seed(seed, "distill"))
        result = distill_middle(emulator, model, plan, batches, settings.distill_lr, device)
    after = middle_gap(emulator, model, len(plan.top), held_out, device) if result.steps else before
    offsite = Offsite(settings, plan, emulator, model, public, seed, device)
    offsite.summary = _summary(plan, model, emulator, result, before, after)
    s = offsite.summary
    console.print(
        f"offsite: emulator keeps layers {list(plan.kept)} of {plan.num_layers} ({s['emulator_bytes'] / 2**20:.1f} of "
        f"{s['full_bytes'] / 2**20:.1f} MiB); middle MSE to the full model {before:.4g} -> {after:.4g} after {result.steps} distillation steps"
    )
    return offsite


def _summary(plan: LayerPlan, full: torch.nn.Module, emulator: torch.nn.Module, result: DistillResult, before: float, after: float) -> dict[str, Any]:
    """The round-0 ``offsite`` record: the layers, the bytes a client receives, the distillation."""
    return {
        "layers": plan.num_layers,
        "kept_layers": list(plan.kept),
        "dropped_layers": list(plan.dropped),
        "adapter_layers": plan.adapter_layers,
        "emulator_bytes": weight_bytes(base_weights(emulator)),
        "full_bytes": weight_bytes(base_weights(full)),
        "middle_bytes": weight_bytes(layer_weights(emulator, plan.middle)),
        "distill_steps": result.steps,
        "distill_loss_first": result.first,
        "distill_loss_last": result.last,
        "middle_mse_before": before,
        "middle_mse_after": after,
    }


@dataclass
class EmulatorTraffic(RoundObserver):
    """Logs the emulator once (round 0) and counts, each round, the model bytes the chosen clients had to receive:
    the whole emulator on a client's first round, its middle again after a FedBiOT alignment; beside it what the full
    model would have cost. Also refuses (before evaluation) a global adapter that does not plug into the full model."""

    offsite: Offsite
    log: MetricsLog
    held: dict[str, int] = field(default_factory=dict)  # client -> the emulator version it holds

    def on_start(self, state: TensorDict, start_round: int) -> None:
        if start_round == 0:
            self.log.append({"round": 0, "split": "offsite", **self.offsite.summary})

    def on_round(self, record: RoundRecord) -> None:
        check_plug_in(self.offsite.full, record.state)
        s, version = self.offsite.summary, self.offsite.version
        sent = full = 0
        for client in record.chosen:
            if client not in self.held:
                sent, full = sent + s["emulator_bytes"], full + s["full_bytes"]
            elif self.held[client] != version:
                sent += s["middle_bytes"]
            self.held[client] = version
        record.fields.setdefault("offsite", {}).update({"model_download_bytes": sent, "full_model_download_bytes": full})


@dataclass
class EmulatorProbe:
    """The emulator with the global adapter on the test set (``emulator_test``), and the plug-in gap: the emulator's
    loss minus the full model's (with the same adapter, the round's ``global_test`` record): > 0 when the plugged-in
    full model does better than the emulator the adapter was trained on."""

    evaluator: Evaluator
    log: MetricsLog

    def evaluate(self, state: TensorDict, round_num: int) -> list[dict[str, Any]]:
        result = self.evaluator.evaluate(state, round_num, f"emulator round {round_num}")
        record = {**result.records[0], "split": EMULATOR_SPLIT}
        full = _full_record(self.log.read(), round_num)
        if full is not None and "loss" in full and "loss" in record:
            record["full_loss"] = full["loss"]
            record["plugin_gap"] = record["loss"] - full["loss"]
        return [record]


def _full_record(records: Sequence[Mapping[str, Any]], round_num: int) -> Mapping[str, Any] | None:
    """The last ``global_test`` record of ``round_num``."""
    found = [r for r in records if r.get("split") == GLOBAL_SPLIT and r.get("round") == round_num]
    return found[-1] if found else None
