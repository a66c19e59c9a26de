"""The stages of :mod:`fedlm.loop_build` that make the round around the runtime: the tasks, the aggregation step and
its wrappers, the validator, the observers, the sampling, and the loop with its milestones."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from fedlm.aggregation.base import Aggregator
from fedlm.aggregation.lora import build_lora_mode
from fedlm.aggregation.lora.client_ranks import resolve_client_ranks
from fedlm.attacks.outcome import AttackOutcomeObserver
from fedlm.compression.setup import seedwise_aggregation, task_builder
from fedlm.config.io import config_to_dict
from fedlm.contribution.setup import client_sampler, contribution_observer
from fedlm.core.errors import FedlmError
from fedlm.core.round import RoundObserver
from fedlm.core.seeding import derive_seed
from fedlm.federation.aggregation_step import SERVER_ID, AggregationStep, RootSetUpdate
from fedlm.federation.observers.budget import CommunicationBudget
from fedlm.federation.observers.checkpointing import Checkpointer
from fedlm.federation.observers.evaluation import EvaluationObserver
from fedlm.federation.observers.harness import HarnessObserver
from fedlm.federation.observers.metrics import RoundLogger
from fedlm.federation.observers.traffic import TrafficMeter
from fedlm.federation.retries import RetryingRuntime
from fedlm.federation.secure_step import MaskedRoundValidator, SecureAggregationStep
from fedlm.federation.server import Round, ServerLoop
from fedlm.federation.tasks import TaskBuilder
from fedlm.federation.validation import RoundValidator
from fedlm.hierarchy.setup import hierarchical
from fedlm.loop_build.parts import LoopContext, LoopParts
from fedlm.privacy.canary_audit import audit_client
from fedlm.privacy.client_models import ClientModelSaver
from fedlm.privacy.round_accounting import EpsilonObserver
from fedlm.privacy.secagg.setup import build_secure_aggregation
from fedlm.privacy.setup import dp_account
from fedlm.watermark.rounds import with_watermark

if TYPE_CHECKING:
    from fedlm.experiment import Session


def tasks(ctx: LoopContext, parts: LoopParts) -> None:
    """The LoRA mode, the clients' ranks and the task builder (``compression.downlink``: from the clients' replica;
    it then also logs the real download sizes, before the other observers)."""
    session, config = ctx.session, ctx.session.config
    parts.lora = build_lora_mode(config.aggregation.lora, session.initial_state, config.peft.r)
    parts.ranks = resolve_client_ranks(config.peft.client_ranks, ctx.names, config.peft.r)
    parts.tasks = task_builder(config, ctx.saved, parts.lora, parts.ranks, session.initial_state, ctx.clients_here)
    if isinstance(parts.tasks, RoundObserver):
        parts.observers = [parts.tasks, *parts.observers]


def aggregation_step(ctx: LoopContext, parts: LoopParts) -> None:
    """The aggregation step (with FLTrust's root-set update when the aggregator needs one), the secure aggregation
    it may run under, and the plain validator."""
    fed = ctx.session.config.federation
    root_update = _root_set_update(ctx.session, parts.aggregator, parts.tasks)
    parts.step = AggregationStep(parts.aggregator, parts.lora, parts.ranks, fed.min_clients, root_update)
    parts.secure = build_secure_aggregation(ctx.session.config, parts.aggregator, len(ctx.names))
    parts.aggregation = parts.step
    parts.validator = RoundValidator(ctx.names, fed.max_num_examples)


def secure_or_retries(ctx: LoopContext, parts: LoopParts) -> None:
    """A deployment under SecAgg+: rounds 0-3 on the nodes, 4 in the step, masked validation, no retries (a protocol
    round cannot be resumed). Otherwise: retried rounds, the step under simulated SecAgg+ or (fedkseed) as seed lists."""
    session, fed = ctx.session, ctx.session.config.federation
    on_nodes = getattr(parts.runtime, "masked_secure_aggregation", None) if parts.secure is not None else None
    if parts.secure is not None and on_nodes is not None:
        if session.attack is not None:
            raise FedlmError(
                "`attack` cannot run under `privacy.secure_aggregation` over `federation.runtime: flower`: "
                "the server never sees an update to alter; run the attack in the simulation"
            )
        parts.runtime, secure_sum = on_nodes(parts.secure, parts.lora.to_server_space(session.initial_state, [], {}, {})[0])
        parts.aggregation = SecureAggregationStep(parts.step, secure_sum)
        parts.validator = MaskedRoundValidator(ctx.names, fed.max_num_examples)
        return
    parts.runtime = RetryingRuntime(parts.built_runtime, fed.min_clients, fed.round_retries, fed.retry_wait_s, ctx.log, ctx.console)
    parts.aggregation = SecureAggregationStep(parts.step, parts.secure) if parts.secure is not None else parts.step
    parts.aggregation = seedwise_aggregation(session.config, parts.replay, ctx.saved) or parts.aggregation


def watermark(ctx: LoopContext, parts: LoopParts) -> None:
    """``watermark``: the shared mark after aggregation, and with ``per_client`` the marked downloads."""
    session = ctx.session
    parts.tasks, parts.aggregation, parts.observers = with_watermark(
        session.config,
        session.model,
        session.loaded.tokenizer,
        session.loaded.device,
        ctx.names,
        ctx.run_dir.root,
        parts.tasks,
        parts.aggregation,
        parts.observers,
    )


def contribution(ctx: LoopContext, parts: LoopParts) -> None:
    """``contribution.methods``: the clients' scores, after aggregation (the last of the extra observers)."""
    parts.contribution = contribution_observer(ctx.session, parts.aggregator, parts.lora, parts.ranks, ctx.log, ctx.console)
    if parts.contribution is not None:
        parts.observers = [*parts.observers, parts.contribution]


def round_(ctx: LoopContext, parts: LoopParts) -> None:
    """The round with its observers (:func:`round_observers`); the sampling (uniform, by contribution, or the
    continual stream's present clients); under ``hierarchy`` the clients train under edge aggregators (HierFAVG)."""
    session, fed = ctx.session, ctx.session.config.federation
    observers = round_observers(ctx, parts.observers)
    parts.round = Round(
        ctx.names, fed.clients_per_round, session.config.seed, parts.tasks, parts.built_runtime, parts.validator, parts.aggregation, observers
    )
    parts.round.sample = client_sampler(session, parts.contribution)
    if parts.continual is not None:
        parts.round.sample = parts.continual.sampler
    parts.round = hierarchical(parts.round, session.config)


def round_observers(ctx: LoopContext, extra: list[RoundObserver]) -> list[RoundObserver]:
    """What records each round, in order: the audit's client models, traffic, epsilon, attack outcomes, ``extra``,
    the log."""
    config, names = ctx.session.config, ctx.names
    observers: list[RoundObserver] = []
    audit = config.eval.audit
    if audit is not None and audit.client_model:
        observers.append(ClientModelSaver(ctx.run_dir.root, config.federation.rounds, audit_client(audit, names)))
    observers.append(TrafficMeter())
    account = dp_account(config, len(names))
    if account is not None:
        observers.append(EpsilonObserver(account))
    if ctx.session.attack is not None:
        observers.append(AttackOutcomeObserver(ctx.session.attack.attackers))
    observers.extend(extra)
    observers.append(RoundLogger(ctx.log, ctx.console, config.federation.rounds, config.peft.r))
    return observers


def continual_milestone(ctx: LoopContext, parts: LoopParts) -> None:
    """``continual``: after every stage, before the checkpoint, every slice evaluated and the forgetting."""
    if parts.continual is not None:
        parts.milestones.append(parts.continual.observer(ctx.session.evaluator(ctx.progress), ctx.log, ctx.console))


def evaluation_milestones(ctx: LoopContext, parts: LoopParts) -> None:
    """The test-set evaluation with the attack's and offsite's probes, and ``eval.harness`` tasks on the global model."""
    if not ctx.evaluate:
        return
    session, config = ctx.session, ctx.session.config
    probes = session.attack_probes(ctx.progress)
    if session.offsite is not None:  # the emulator's loss and the plug-in gap
        probes.append(session.offsite.probe(session.evaluator(ctx.progress), ctx.log))
    evaluation = EvaluationObserver(session.evaluator(ctx.progress), config.eval, config.federation.rounds, ctx.run_dir, ctx.log, ctx.console, probes)
    parts.milestones.append(evaluation)
    if config.eval.harness is not None:
        harness = HarnessObserver(
            session.model, session.loaded.tokenizer, config.eval.harness, config.eval.at_start, config.federation.rounds, ctx.log, ctx.console
        )
        parts.milestones.append(harness)


def checkpoint_and_budget(ctx: LoopContext, parts: LoopParts) -> None:
    """The checkpoints (of ``ctx.saved``: with the compression's state), then ``federation.max_mib``'s budget."""
    config, fed = ctx.session.config, ctx.session.config.federation
    config_yaml = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    parts.milestones.append(Checkpointer(ctx.run_dir, ctx.saved, config_yaml, config.seed, fed.checkpoint_every, fed.rounds, fed.keep_checkpoints))
    if fed.max_mib is not None:
        parts.milestones.append(CommunicationBudget(fed.max_mib, fed.rounds, ctx.log))


def loop(ctx: LoopContext, parts: LoopParts) -> None:
    """The loop over the rounds with its milestones; ``systems`` runs it on the simulated clock."""
    parts.loop = ServerLoop(parts.round, ctx.session.config.federation.rounds, parts.milestones)
    if parts.systems is not None:
        parts.loop = parts.systems.server_loop(parts.loop)


def _root_set_update(session: Session, aggregator: Aggregator, tasks: TaskBuilder) -> RootSetUpdate | None:
    """FLTrust's server update on the root set (no DP-SGD), for aggregators that need one."""
    if not aggregator.needs_server_update:
        return None
    trainer, root, seed = session.trainer(private=False), session.data.root, session.config.seed
    return RootSetUpdate(
        lambda state, plan: trainer.train(SERVER_ID, root, state, plan),
        lambda round_num: tasks.plan(round_num, derive_seed(seed, "server-root", round_num)),
    )
