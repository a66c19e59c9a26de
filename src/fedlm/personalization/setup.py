"""Attaching a personalization method to a simulated run, and what a run leaves for each client after its last
round: ``RUN_DIR/clients/<name>/adapter/`` (a peft adapter folder, loadable with
``PeftModel.from_pretrained(base, path)``), ``personal.json`` (how inference uses it) and ``profile.safetensors``
(the client's data centroid, :mod:`fedlm.personalization.profile`), and the personal evaluation's records."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlm.core.runtime import Runtime
from fedlm.core.update import TensorDict
from fedlm.evaluation.evaluator import Evaluator
from fedlm.models.adapters import load_trainable_state, save_adapter
from fedlm.personalization.base import ClientSide, PersonalMethod, build_method
from fedlm.personalization.evaluation import personal_records, score_rows
from fedlm.personalization.logit_mix import LogitMixture
from fedlm.personalization.profile import compute_profile, save_profile
from fedlm.personalization.runtime import PersonalizedRuntime
from fedlm.personalization.store import ClientStore
from fedlm.personalization.two_adapters import with_local_adapter
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.personalization import best_per_client
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import RunDir

if TYPE_CHECKING:
    from fedlm.experiment import Session

PERSONAL_JSON = "personal.json"
RowsOf = Callable[[str], list[dict[str, Any]]]
PROFILE = "profile.safetensors"


def client_store(run_dir: RunDir) -> ClientStore:
    """The run's ``clients/`` folder."""
    return ClientStore(run_dir.root / "clients")


def personal_method(session: Session, run_dir: RunDir) -> PersonalMethod:
    """The configured method on the simulated clients of ``session`` (a trainer without DP-SGD or aggregator hooks)."""
    side = ClientSide(session.config, session.trainer(private=False), session.data.client_train, client_store(run_dir))
    return build_method(session.config, side)


def personalize(session: Session, runtime: Runtime, run_dir: RunDir) -> PersonalizedRuntime | None:
    """``runtime`` with the configured method on its clients (None without ``personalization.method``)."""
    if session.config.personalization.method is None:
        return None
    return PersonalizedRuntime(runtime, personal_method(session, run_dir), run_dir.checkpoints)


def finish_personalization(
    session: Session, run_dir: RunDir, state: TensorDict, log: MetricsLog, console: RunConsole, runtime: object | None = None
) -> None:
    """Write every client's personal adapter, ``personal.json`` and profile; log the personal evaluation. A runtime
    whose clients keep their state elsewhere (Flower SuperNodes: the capability ``personal_on_nodes``) does both
    there and answers the records; nothing personal is written here then."""
    config = session.config
    if config.personalization.method is None:
        return
    on_nodes = getattr(runtime, "personal_on_nodes", None)
    if callable(on_nodes):
        log_personal(on_nodes(state), log, console)
        return
    method = personal_method(session, run_dir)
    personal = {client: write_personal(session, method, client, state) for client in session.data.client_names}
    load_trainable_state(session.model, state)
    console.print(f"personal adapters ({method.name}) of {len(personal)} clients in {method.side.store.root}")
    if config.personalization.evaluate:
        log_personal(evaluate_personal(session, method, state, personal), log, console)


def write_personal(session: Session, method: PersonalMethod, client: str, state: TensorDict) -> TensorDict:
    """Write ``client``'s personal adapter (given the final global ``state``), ``personal.json`` and profile into its
    folder of the method's store; returns the personal adapter state."""
    config, tokenizer = session.config, session.loaded.tokenizer
    folder = method.side.store.client_dir(client)
    personal = method.personal_state(client, state)
    save_adapter(session.model, personal, folder / "adapter")
    tokenizer.save_pretrained(str(folder / "adapter"))
    info = {"method": method.name, "combine": method.combine, "client": client, "round": config.federation.rounds, **method.describe()}
    method.export(client, folder)
    (folder / PERSONAL_JSON).write_text(json.dumps(info, indent=1) + "\n")
    examples = [getattr(ex, "chosen", ex) for ex in session.data.client_train[client]]  # dpo: a pair's prompt, once
    save_profile(
        folder / PROFILE,
        compute_profile(session.model, tokenizer, examples, session.loaded.device, config.eval.batch_size, config.data.max_length),
    )
    return personal


def evaluate_personal(session: Session, method: PersonalMethod, state: TensorDict, personal: dict[str, TensorDict]) -> list[dict[str, Any]]:
    """The ``personal`` records of the clients in ``personal`` (global, personal and each mix on own and others' shares)."""
    evaluator = personal_evaluator(session)
    models = evaluated_models(method, evaluator, state, personal)
    return personal_records(evaluator, session.config.federation.rounds, state, list(personal), models)


def log_personal(records: list[dict[str, Any]], log: MetricsLog, console: RunConsole) -> None:
    """Append the personal evaluation's records to ``metrics.jsonl`` and say how many clients the personal model helps."""
    for record in records:
        log.append(record)
    best = best_per_client(records)
    if best:
        wins = sum(1 for b in best if b["wins"])
        console.print(f"personalization: the best personal model beats the global one on its own share for {wins}/{len(best)} clients")


def personal_evaluator(session: Session) -> Evaluator:
    """The run's evaluator without generation (losses only: one pass per model)."""
    config = session.config
    eval_config = config.eval.model_copy(update={"generate": False})
    return Evaluator(
        session.model,
        session.loaded.tokenizer,
        session.data.test,
        eval_config,
        session.loaded.device,
        config.data.max_length,
        None,
        session.objective,
    )


#: the personal side's weight of the mixes evaluated after the run (inference can choose any, or per input)
MIX_WEIGHT = 0.5


def evaluated_models(method: PersonalMethod, evaluator: Evaluator, state: TensorDict, personal: dict[str, TensorDict]) -> dict[str, RowsOf]:
    """Each client's models scored after the run besides the global one: ``personal`` (``dual``: FedDPA's
    ``alpha * global + (1 - alpha) * local`` adapters, and ``local`` alone) and the mixes with the global model at
    weight 0.5 on the personal side: ``adapter`` (both LoRA adapters active, ``0.5 dW_g + 0.5 dW_p``; LoRA runs) and
    ``logits`` (``0.5 p_personal + 0.5 p_global``)."""
    model, rounds = evaluator.model, method.side.config.federation.rounds
    lora = method.side.config.peft.method == "lora"
    dual = method.combine == "dual"
    alpha = float(method.params.weight) if dual else 0.0

    def adapters(global_weight: float) -> RowsOf:
        def rows(client: str) -> list[dict[str, Any]]:
            load_trainable_state(model, state)
            return score_rows(evaluator, None, rounds, with_local_adapter(model, personal[client], global_weight))  # type: ignore[arg-type]

        return rows

    def alone(client: str) -> list[dict[str, Any]]:
        return score_rows(evaluator, personal[client], rounds, method.personal_context(client))

    def logits(client: str) -> list[dict[str, Any]]:
        mixture = LogitMixture(model, state, personal[client], MIX_WEIGHT, lambda: method.personal_context(client))
        return score_rows(dataclasses.replace(evaluator, model=mixture), None, rounds)  # type: ignore[arg-type]

    models: dict[str, RowsOf] = {"personal": adapters(alpha) if dual else alone}
    if dual:
        models["local"] = alone
    if lora and method.name != "prompt":  # prompt's personal side shares the global LoRA: nothing to mix there
        models[f"adapter@{MIX_WEIGHT:g}"] = adapters(1.0 - MIX_WEIGHT)
    models[f"logits@{MIX_WEIGHT:g}"] = logits
    return models


def personal_folder(run_dir: Path, client: str) -> Path:
    """``RUN_DIR/clients/<name>/``."""
    return ClientStore(Path(run_dir) / "clients").client_dir(client)
