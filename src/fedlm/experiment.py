"""Building a federated experiment from its config and running it into a run directory (new or resumed)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedlm.aggregation.base import Aggregator, build_aggregator
from fedlm.attacks.backdoor_probe import BackdoorProbe, triggered_test_set
from fedlm.attacks.harness import AttackPlan, build_attack_plan, record_poisoner
from fedlm.attacks.safety_probe import build_safety_probe
from fedlm.compression.setup import (
    with_compression_state,
)
from fedlm.config.io import config_to_dict, flatten_keys
from fedlm.config.rules import check_federation
from fedlm.config.schema import ExperimentConfig
from fedlm.continual.data import continual_federated_data
from fedlm.continual.report import continual_section
from fedlm.core.errors import FedlmError
from fedlm.core.round import RoundObserver
from fedlm.core.runtime import Runtime
from fedlm.core.seeding import derive_seed
from fedlm.core.task import TrainerHook
from fedlm.core.update import TensorDict
from fedlm.data.node_local import node_data, server_data
from fedlm.data.prepare import FederatedData, prepare_federated_data
from fedlm.evaluation.evaluator import Evaluator
from fedlm.federation.checkpoint import list_checkpoints, load_checkpoint
from fedlm.federation.data_parallel import ClientProcesses
from fedlm.federation.observers.budget import BudgetReached
from fedlm.federation.observers.evaluation import Probe
from fedlm.federation.server import ServerLoop
from fedlm.federation.trainer import ClientTrainer
from fedlm.loop_build import LoopContext, build_loop
from fedlm.models.adapters import attach_adapter, peft_summary, save_adapter, trainable_state
from fedlm.models.hardware import resolve_device
from fedlm.models.init_adapter import load_init_adapter
from fedlm.models.loading import LoadedModel, load_base_model
from fedlm.objectives import Objective, build_objective, objective_of
from fedlm.objectives.dpo import DPOObjective
from fedlm.offsite.setup import Offsite, adapter_layers, build_offsite
from fedlm.personalization.setup import finish_personalization
from fedlm.privacy.audit_session import audit_session
from fedlm.privacy.canary_audit import canary_inserter, compose_transforms
from fedlm.privacy.sample_dp import SampleDP, sample_dp_settings
from fedlm.privacy.setup import wrap_with_dp
from fedlm.reporting.contribution import contribution_section
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.personalization import personal_section
from fedlm.reporting.progress import Progress, RunConsole
from fedlm.reporting.report import write_report
from fedlm.reporting.run_dir import RunDir

# Keys that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = {"federation.rounds"}


@dataclass
class Session:
    """What every run of a config shares: the base model with its adapter, the data, the starting adapter."""

    config: ExperimentConfig
    loaded: LoadedModel
    model: PeftModel | PreTrainedModel  # PreTrainedModel itself for `peft.method: full`
    data: FederatedData
    initial_state: TensorDict
    attack: AttackPlan | None = None
    sample_dp: SampleDP | None = None  # DP-SGD in every client's local steps (privacy.sample_dp)
    objective: Objective = field(default_factory=lambda: build_objective("sft"))  # sft | clm | dpo (config.objective)
    offsite: Offsite | None = None  # offsite-tuning: the clients train on its emulator, the server keeps `model` (config.offsite)

    def evaluator(self, progress: Progress | None) -> Evaluator:
        """An evaluator on the shared test set."""
        return Evaluator(
            self.model,
            self.loaded.tokenizer,
            self.data.test,
            self.config.eval,
            self.loaded.device,
            self.config.data.max_length,
            progress,
            self.objective,
        )

    def aggregator(self) -> Aggregator:
        """The configured aggregator, wrapped in client-level DP when ``privacy.client_dp`` is set (and holding the
        clients' error-feedback residuals under ``compression.uplink``)."""
        inner = build_aggregator(self.config.aggregation.name, self.config.aggregation.params())
        return with_compression_state(wrap_with_dp(inner, self.config, len(self.data.client_names)), self.config)

    def attack_probes(self, progress: Progress | None) -> list[Probe]:
        """The extra evaluations an attack needs: backdoor success, or the refusal rate on harmful prompts."""
        name = self.attack.spec.name if self.attack is not None else None
        if name == "backdoor":
            return [self.backdoor_probe(progress)]
        if name == "safety":
            return [build_safety_probe(self.model, self.loaded.tokenizer, self.config, self.loaded.device, progress)]
        return []

    def backdoor_probe(self, progress: Progress | None) -> BackdoorProbe:
        """The attack-success probe of a backdoor attack: generation on the triggered test prompts."""
        if self.attack is None or self.attack.spec.name != "backdoor":
            raise ValueError("backdoor_probe needs a session with a backdoor attack")
        params = self.attack.params.model_dump()
        test = triggered_test_set(self.data.test, self.config, self.loaded.tokenizer, params["trigger"], params["target"])
        eval_config = self.config.eval.model_copy(update={"generate": True})
        evaluator = Evaluator(self.model, self.loaded.tokenizer, test, eval_config, self.loaded.device, self.config.data.max_length, progress)
        return BackdoorProbe(evaluator, params["target"])

    def trainer(self, hooks: list[TrainerHook] | None = None, private: bool = True) -> ClientTrainer:
        """A client trainer on the shared model (DP-SGD under ``privacy.sample_dp`` unless ``private`` is False)."""
        fed = self.config.federation
        return ClientTrainer(
            self.offsite.emulator if self.offsite is not None else self.model,
            self.loaded.tokenizer.pad_token_id,
            self.loaded.device,
            fed.weight_decay,
            fed.max_grad_norm,
            hooks or [],
            fed.optimizer,
            self.sample_dp if private else None,
            self.objective,
        )


def build_session(config: ExperimentConfig, console: RunConsole, node_client: str | None = None) -> Session:
    """Load the base model once, attach the adapter, read, partition and tokenize the data.

    With ``partition.method: node_local`` there is no partition: the server's session (``node_client`` None) has the
    test set and no client data, a SuperNode's session (``node_client``: the client it serves) has that client's
    examples from its own ``data.train`` (:mod:`fedlm.data.node_local`)."""
    loaded, model, objective = build_model(config, console)
    data = _federated_data(config, loaded.tokenizer, objective, node_client)
    check_federation(config, data.client_names)  # the config rules that need the real clients
    n = len(data.client_names)
    attack = build_attack_plan(config, data.client_names)
    sizes = ", ".join(f"{c}: {len(data.client_train[c])}" if c in data.client_train else c for c in data.client_names)
    if config.partition.method == "node_local" and node_client is None:
        sizes = ", ".join(data.client_names) + ": data on their SuperNodes"
    unit = {"clm": "blocks", "dpo": "pairs"}.get(objective.name, "examples")
    in_global = sum(1 for ex in data.test if ex.in_global)
    console.print(f"{n} clients ({sizes}); {in_global} test {unit}; objective {objective.name}")
    unshared = [c for c in data.client_names if not any(ex.client == c for ex in data.test)]
    if unshared and data.test:
        console.print(
            f"no test share for {', '.join(unshared)} (no held-out records of theirs, or under `objective: clm` too little text for one block); the global test set covers all"
        )
    if attack is not None:
        console.print(f"attack {attack.spec.name} ({attack.spec.kind}) by {', '.join(sorted(attack.attackers))}")
    sample_dp = sample_dp_settings(config, {c: len(data.client_train.get(c, [])) for c in data.client_names})  # solves a target epsilon
    offsite = build_offsite(config, model, loaded.tokenizer, loaded.device, console) if config.offsite is not None else None
    return Session(config, loaded, model, data, trainable_state(model), attack, sample_dp, objective, offsite)


def build_model(
    config: ExperimentConfig, console: RunConsole, device: torch.device | None = None
) -> tuple[LoadedModel, PeftModel | PreTrainedModel, Objective]:
    """The base model with its adapter (from ``model.init_adapter`` when set) and the objective: what every process
    of a client loads."""
    loaded = load_base_model(config.model, seed=derive_seed(config.seed, "base-init") % 2**31, device=device)
    console.print(f"model {config.model.name}: {loaded.dtype} on {loaded.device}")
    model = attach_adapter(
        loaded.model,
        config.peft,
        seed=derive_seed(config.seed, "adapter-init") % 2**31,
        freeze_lora_a=config.aggregation.lora == "ffa",
        layers=adapter_layers(config, loaded.model),  # offsite: the bottom and top layers only
    )
    if config.model.init_adapter is not None:
        load_init_adapter(model, config.peft, Path(config.model.init_adapter))
        console.print(f"adapter starts from {config.model.init_adapter}")
    objective = objective_of(config)
    if isinstance(objective, DPOObjective) and objective.params.reference == "init_adapter":
        objective.reference_state = trainable_state(model)  # DPO's pi_ref = the loaded adapter
    return loaded, model, objective


def client_process_model(config: ExperimentConfig, rank: int) -> tuple[torch.nn.Module, Objective, torch.device]:
    """What data-parallel worker ``rank`` of a client loads (``federation.client_processes``): the same base model,
    adapter and objective as rank 0, on GPU ``rank`` when CUDA is used."""
    device = resolve_device(config.model.device)
    device = torch.device("cuda", rank) if device.type == "cuda" else device
    loaded, model, objective = build_model(config, RunConsole(quiet=True), device)
    return model, objective, loaded.device


@contextmanager
def client_processes(session: Session, here: bool = True) -> Iterator[ClientProcesses | None]:
    """The worker processes of a data-parallel client, for the whole run (None with one process per client, or when
    the clients do not train ``here``: over Flower each SuperNode starts its own)."""
    n = session.config.federation.client_processes
    if n == 1 or not here:
        yield None
        return
    with ClientProcesses(n, partial(client_process_model, session.config), session.loaded.device) as processes:
        yield processes


def _federated_data(config: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, objective: Objective, node_client: str | None) -> FederatedData:
    """The run's data: a partition of one dataset, or (``node_local``) the server's test set or one node's client."""
    if config.continual is not None:  # the records cut into slices that arrive over time
        return continual_federated_data(config, tokenizer, objective)
    if config.partition.method != "node_local":
        return prepare_federated_data(
            config.data,
            config.partition,
            config.eval,
            tokenizer,
            config.seed,
            compose_transforms(record_poisoner(config), canary_inserter(config)),
            root_set_size(config),
            objective=objective,
        )
    if root_set_size(config) > 0:
        raise FedlmError(
            f"`aggregation.name: {config.aggregation.name}` trains on a server root set drawn from the clients' "
            "data, which `partition.method: node_local` keeps on the SuperNodes; choose another aggregator"
        )
    if node_client is None:
        return server_data(config.data, config.partition, config.eval, tokenizer, config.seed, objective)
    return node_data(config.data, config.partition, tokenizer, config.seed, objective, node_client)


def root_set_size(config: ExperimentConfig) -> int:
    """How many clean examples the server needs for its own update (FLTrust's root set), 0 for most aggregators."""
    aggregator = build_aggregator(config.aggregation.name, config.aggregation.params())
    return int(getattr(aggregator.params, "root_size", 0)) if aggregator.needs_server_update else 0


def build_server_loop(
    session: Session,
    aggregator: Aggregator,
    run_dir: RunDir,
    log: MetricsLog,
    console: RunConsole,
    progress: Progress | None = None,
    evaluate: bool = True,
    runtime: Runtime | None = None,
    observers: Sequence[RoundObserver] = (),
    processes: ClientProcesses | None = None,
) -> ServerLoop:
    """The server loop of ``session`` over ``runtime`` (default: the in-process simulation): the round with its
    wrappers (retries, attacks, secure aggregation) and observers, attached by the ordered stages of
    :mod:`fedlm.loop_build` and nowhere else. ``observers``
    (a new per-round concern) run after the built-in ones and before the metrics log, so what they add to a round's
    record is logged with it. ``processes``: the simulated clients train data-parallel on these
    (``federation.client_processes``)."""
    ctx = LoopContext(session, aggregator, run_dir, log, console, progress, evaluate, processes, clients_here=runtime is None)
    return build_loop(ctx, runtime, observers)


def run_federated(session: Session, run_dir: RunDir, resume: bool, console: RunConsole, runtime: Runtime | None = None) -> TensorDict:
    """Run (or resume) the federation of ``session`` into ``run_dir`` over ``runtime`` (default: the simulation);
    returns the final global adapter state."""
    config = session.config
    config_yaml = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    log = MetricsLog(run_dir.metrics)
    state, start = session.initial_state, 0
    aggregator = session.aggregator()
    if resume:
        check_resumable(run_dir, config)
        checkpoints = list_checkpoints(run_dir.checkpoints)
        if checkpoints:
            ckpt = load_checkpoint(checkpoints[-1])
            state, start = ckpt.global_state, ckpt.round
            aggregator.load_state_dict(ckpt.aggregator_state)
        log.truncate_after_round(start if checkpoints else -1)
        console.print(f"resuming {run_dir.root} after round {start}")
    run_dir.config.write_text(config_yaml)
    with Progress(console) as progress, client_processes(session, here=runtime is None) as processes:
        loop = build_server_loop(session, aggregator, run_dir, log, console, progress, runtime=runtime, processes=processes)
        try:
            state = loop.run(state, start)
        except BudgetReached as stop:  # federation.max_mib: end cleanly with the state reached
            state = stop.state
            log.append({"round": stop.round, "split": "budget", "event": "stopped", "spent_bytes": stop.spent_bytes, "reason": str(stop)})
            console.print(f"[yellow]{stop}[/yellow]")
    finish_personalization(session, run_dir, state, log, console, runtime)
    finish_run(session, run_dir, state, console)
    return state


def finish_run(session: Session, run_dir: RunDir, state: TensorDict, console: RunConsole | None = None) -> None:
    """Save the final adapter (loadable with ``peft.PeftModel.from_pretrained``), run the privacy audit when
    ``eval.audit`` is set, and write the report."""
    save_adapter(session.model, state, run_dir.adapter)
    session.loaded.tokenizer.save_pretrained(str(run_dir.adapter))
    audit = session.config.eval.audit
    if audit is not None:
        audit_session(session, run_dir, state, session.config.federation.rounds, None, audit.max_examples, console or RunConsole(quiet=True))
    write_run_report(session, run_dir)


def write_run_report(session: Session, run_dir: RunDir) -> None:
    """Write ``report.md`` from ``metrics.jsonl`` (with the audit of ``audit.json`` when there is one)."""
    records = MetricsLog(run_dir.metrics).read()
    personal = personal_section(records, run_dir.root)  # personalization.method: own vs others' shares
    continual = continual_section(records, run_dir.root)  # continual: the accuracy matrix, forgetting
    contribution = contribution_section(records, run_dir.root)  # contribution.methods: scores per client
    write_report(
        run_dir.root,
        records,
        title=f"fedlm run: {run_dir.root.name}",
        config_summary=config_summary(session),
        extra_sections=[section for section in (personal, continual, contribution) if section],
    )


def config_summary(session: Session) -> dict[str, Any]:
    """The settings a reader of the report needs first."""
    c = session.config
    return {
        "model": c.model.name,
        "dtype": str(session.loaded.dtype).removeprefix("torch."),
        "peft": peft_summary(c.peft) + (f" from {c.model.init_adapter}" if c.model.init_adapter else ""),
        "data": c.data.train,
        "objective": " ".join([c.objective.name, *(f"{k}={v}" for k, v in c.objective.params().items())]),
        "partition": f"{c.partition.method} ({len(session.data.client_names)} clients)",
        "rounds": c.federation.rounds,
        "clients_per_round": c.federation.clients_per_round or len(session.data.client_names),
        "local_steps x batch": f"{c.federation.local_steps} x {c.federation.batch_size}",
        "lr": f"{c.federation.lr} ({c.federation.lr_schedule})",
        "aggregation": f"{c.aggregation.name} (lora: {c.aggregation.lora})",
        "client ranks": c.peft.client_ranks or (f"all {c.peft.r}" if c.peft.method == "lora" else "n/a"),
        "seed": c.seed,
    }


def check_resumable(run_dir: RunDir, config: ExperimentConfig) -> None:
    """Refuse to resume a run whose saved config differs from ``config`` (except the number of rounds)."""
    if not run_dir.config.is_file():
        raise FedlmError(f"--resume: {run_dir.config} is missing, so this folder holds no fedlm run")
    saved = flatten_keys(yaml.safe_load(run_dir.config.read_text()))
    now = flatten_keys(config_to_dict(config))
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in _RESUMABLE_CHANGES)
    if changed:
        raise FedlmError(
            f"--resume: the config differs from the saved run in {', '.join(changed)}; "
            "resume with the same config (only `federation.rounds` may grow) or start a new `output_dir`"
        )
