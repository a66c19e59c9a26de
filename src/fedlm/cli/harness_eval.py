"""``fedlm eval RUN_DIR --tasks ...``: standard benchmarks (lm-evaluation-harness) on a run's model.

Which model: the run's global adapter (``RUN_DIR/adapter``), a client's personal model (``--client NAME``:
``RUN_DIR/clients/NAME/adapter``), or a base model without any adapter (``--model-name NAME``, the "base" row; RUN_DIR
may then be any folder for the results). Each task's result goes to ``RUN_DIR/eval/<task>.json`` under the model's
label, and the table of every model and task into ``report.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlm.config.io import load_config
from fedlm.config.schema import ExperimentConfig, ModelConfig
from fedlm.core.errors import FedlmError
from fedlm.evaluation.harness import TaskOutcome, check_task_names, include_paths, lm_eval_version, run_tasks, save_outcomes, task_manager
from fedlm.experiment import build_model
from fedlm.models.loading import load_base_model
from fedlm.reporting.harness_report import update_report
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import RunDir


@dataclass
class EvalRequest:
    """What ``fedlm eval`` was asked."""

    run_dir: Path
    tasks: list[str]
    client: str | None = None
    mix: str | None = None
    limit: int | None = None
    include: tuple[str, ...] = ()
    model_name: str | None = None
    batch_size: int = 8
    num_fewshot: int | None = None
    allow_code_execution: bool = False


def split_tasks(text: str) -> list[str]:
    """``mmlu, arc_easy`` -> ``["mmlu", "arc_easy"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def evaluate_request(request: EvalRequest, console: RunConsole) -> list[TaskOutcome]:
    """Check the request, load the model it names, run the tasks, save and report them."""
    if request.model_name is not None and (request.client is not None or request.mix is not None):
        raise FedlmError("`--model-name` evaluates a base model without any adapter, so `--client` and `--mix` do not apply; drop one of them")
    folder = RunDir(request.run_dir)
    config = _run_config(folder, request.model_name is not None)
    if request.mix is None:
        adapter, label = _which_model(folder, request.client, request.model_name)
    manager = task_manager(include_paths(request.include))  # every folder and task checked before the model loads
    tasks = check_task_names(request.tasks, manager)
    lm = None
    if request.mix is not None:  # the inference phase's mix of the client's personal model and the global one
        model, tokenizer, about, lm, label = _load_mixed(folder, request.client, request.mix, request.batch_size, console)
    else:
        model, tokenizer, about = _load(config, adapter, request.model_name, console)
    console.print(f"harness on {label}: {', '.join(tasks)}" + (f" (first {request.limit} documents each)" if request.limit else ""))
    outcomes = run_tasks(
        model,
        tokenizer,
        tasks,
        manager,
        limit=request.limit,
        batch_size=request.batch_size,
        num_fewshot=request.num_fewshot,
        allow_code_execution=request.allow_code_execution,
        lm=lm,
    )
    about.update(limit=request.limit, num_fewshot=request.num_fewshot, lm_eval=lm_eval_version())
    save_outcomes(folder.root / "eval", label, outcomes, about)
    for outcome in outcomes:
        head = outcome.headline()
        if outcome.error is not None:
            console.print(f"[red]{outcome.task} failed[/red]: {outcome.error}")
        elif head is not None:
            console.print(f"{outcome.task}: {head[0]} {head[1]:.4f} over {outcome.num_samples} documents ({outcome.seconds:.1f} s)")
    update_report(folder.root)
    return outcomes


def _run_config(folder: RunDir, base_only: bool) -> ExperimentConfig | None:
    """The run's resolved config; None for ``--model-name`` on a folder that holds no run."""
    if folder.config.is_file():
        return load_config(folder.config)
    if base_only:
        return None
    raise FedlmError(
        f"{folder.root} holds no fedlm run (config.yaml is missing); give a run folder of `fedlm run`, "
        "or evaluate a base model there with --model-name NAME"
    )


def _which_model(folder: RunDir, client: str | None, model_name: str | None) -> tuple[Path | None, str]:
    """The adapter folder to load (None: the bare base model) and the model's label in the results."""
    if model_name is not None:
        return None, f"base {model_name}"
    if client is not None:
        path = folder.root / "clients" / client / "adapter"
        if not path.is_dir():
            have = sorted(p.parent.name for p in (folder.root / "clients").glob("*/adapter") if p.is_dir())
            known = f"clients with one: {', '.join(have)}" if have else "no client of this run has one"
            raise FedlmError(
                f"`--client {client}`: {path} does not exist, so client {client!r} has no personal model in this run ({known}); "
                "evaluate the global model without --client, or train personal models first"
            )
        return path, f"client {client}"
    if not folder.adapter.is_dir():
        raise FedlmError(
            f"{folder.root} has no adapter/ (the run did not finish); finish it with `fedlm run CONFIG --resume`, "
            "or evaluate the base model with --model-name NAME"
        )
    return folder.adapter, "global"


def _load(config: ExperimentConfig | None, adapter: Path | None, model_name: str | None, console: RunConsole) -> tuple[Any, Any, dict[str, Any]]:
    """The model to evaluate, its tokenizer and what the results should say about it."""
    if adapter is None:
        base = config.model if config is not None else ModelConfig()
        model_config = base.model_copy(update={"name": model_name or base.name, "init_adapter": None})
        loaded = load_base_model(model_config)
        about = {"model": model_config.name, "adapter": None}
        return loaded.model, loaded.tokenizer, {**about, "dtype": _dtype(loaded.dtype), "device": str(loaded.device)}
    if config is None:
        raise FedlmError("an adapter is evaluated with its run's config.yaml, which this folder lacks")
    chained = config.model_copy(update={"model": config.model.model_copy(update={"init_adapter": str(adapter)})})
    loaded, model, _ = build_model(chained, console)
    about = {"model": config.model.name, "adapter": str(adapter), "dtype": _dtype(loaded.dtype), "device": str(loaded.device)}
    return model, loaded.tokenizer, about


def _load_mixed(folder: RunDir, client: str | None, mix: str, batch_size: int, console: RunConsole) -> tuple[Any, Any, dict[str, Any], Any, str]:
    """The run opened for inference (one base model, every adapter) under ``--mix`` for ``client``: the model, its
    tokenizer, what the results say about it, the harness model (:class:`~fedlm.inference.harness_lm.MixedHFLM`)
    and its label (``client NAME MIX``; the weight and combine from the run's ``inference`` section)."""
    from fedlm.inference.harness_lm import MixedHFLM  # noqa: PLC0415 - lm-eval's import is slow
    from fedlm.inference.session import open_mixed  # noqa: PLC0415

    if mix != "global" and client is None:
        raise FedlmError(f"`--mix {mix}` combines a client's personal model with the global one: give the client with --client NAME")
    mixed, spec, _ = open_mixed(folder.root, client, mix=mix)
    run = mixed.run
    console.print(f"model {run.config.model.name} with {folder.root}'s adapters, mix {spec.mix} (weight {spec.weight}, {spec.combine})")
    about = {
        "model": run.config.model.name,
        "adapter": str(folder.adapter),
        "mix": {"mix": spec.mix, "client": spec.client, "weight": spec.weight, "max_weight": spec.max_weight, "combine": spec.combine},
        "dtype": _dtype(next(run.model.parameters()).dtype),
        "device": str(run.device),
    }
    label = "global" if spec.mix == "global" and client is None else f"client {client} {spec.mix}"
    return run.model, run.tokenizer, about, MixedHFLM(mixed, spec, batch_size), label


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
