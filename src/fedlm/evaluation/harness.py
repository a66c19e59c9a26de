"""The bridge to EleutherAI's lm-evaluation-harness (``lm-eval``, pinned in pyproject): standard benchmarks on the
base model with a run's adapter, through the harness's own Hugging Face wrapper (``HFLM``) around the in-memory
model, so the harness's tasks, prompts and metrics are used as they are, never re-implemented here.

Tasks come from the harness's own index, from fedlm's shipped task folders (``wordnet_mc``: which WordNet gloss
defines a word, 4 choices, local JSONL; :data:`SHIPPED_TASK_DIRS`) and from the user's folders (``--include-path``,
``eval.harness.include_path``: YAML + local data, as the harness's ``--include_path``). fedlm itself never downloads:
a task whose data is on the hub needs the user's network or cache.

Each task runs on its own, so a task that fails is reported with its error and the others still run. lm-eval seeds
Python's, NumPy's and torch's global generators by default; fedlm passes no seed for those (its randomness is
derived explicitly) and keeps the harness's fixed few-shot seed.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.core.errors import FedlmError
from fedlm.data.readers import EMBEDDED_DIR
from fedlm.evaluation.harness_tasks import check_task_folder

if TYPE_CHECKING:  # lm_eval costs ~6 s to import: loaded on first use
    from lm_eval.tasks import TaskManager

#: fedlm's own lm-eval task folders (YAML + local data), always on the include path.
SHIPPED_TASK_DIRS: tuple[Path, ...] = (EMBEDDED_DIR / "wordnet_mc",)
#: The metrics a table shows first, in order, when a task reports them.
HEADLINE_METRICS = ("acc_norm", "acc", "exact_match", "pass@1", "f1", "mcc", "word_perplexity")


@dataclass
class TaskOutcome:
    """One task's result on one model: the harness's metrics (``acc``, ``acc_stderr``, ...; a filter other than
    ``none`` stays in the name), how many documents, the seconds it took, per-document scores, or the error."""

    task: str
    metrics: dict[str, float] = field(default_factory=dict)
    num_samples: int = 0
    seconds: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def headline(self) -> tuple[str, float] | None:
        """The metric a table shows for this task (``acc_norm`` first), or None (failed, or no known metric)."""
        for name in HEADLINE_METRICS:
            if name in self.metrics:
                return name, self.metrics[name]
        numeric = [k for k in self.metrics if not k.endswith("_stderr")]
        return (numeric[0], self.metrics[numeric[0]]) if numeric else None

    def as_json(self) -> dict[str, Any]:
        """What ``RUN_DIR/eval/<task>.json`` keeps of one model's run of the task."""
        out: dict[str, Any] = {"metrics": self.metrics, "num_samples": self.num_samples, "seconds": round(self.seconds, 3)}
        if self.error is not None:
            out["error"] = self.error
        if self.samples:
            out["samples"] = self.samples
        return out


def include_paths(extra: Sequence[str | Path] = ()) -> tuple[str, ...]:
    """fedlm's shipped task folders and the user's, each checked (a valid task YAML, local data present)."""
    for folder in extra:
        check_task_folder(Path(folder))
    return tuple(str(p) for p in (*SHIPPED_TASK_DIRS, *(Path(f).expanduser().resolve() for f in extra)))


@lru_cache(maxsize=4)
def task_manager(paths: tuple[str, ...]) -> TaskManager:
    """The harness's task index with ``paths`` included (built once per process: indexing takes seconds)."""
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 - lm_eval takes ~6 s to import; only when a harness task runs

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager(include_path=list(paths))


def check_task_names(names: Sequence[str], manager: TaskManager, field_name: str = "--tasks") -> list[str]:
    """``names`` as the harness knows them; an unknown name is refused with the closest names it knows."""
    if not names:
        raise FedlmError(f"`{field_name}` names no task; give e.g. wordnet_mc (fedlm's shipped task), mmlu or arc_easy")
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            close += [k for k in sorted(known) if name.lower() in k.lower() and k not in close][: 5 - len(close)]
            hint = f"closest known: {', '.join(close)}" if close else "no close name; `lm_eval --tasks list` lists them all"
            raise FedlmError(f"`{field_name}`: task {name!r} is not known to lm-evaluation-harness or the include paths; {hint}")
    return list(names)


def run_tasks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    manager: TaskManager,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    keep_samples: bool = True,
    allow_code_execution: bool = False,
    lm: Any = None,
) -> list[TaskOutcome]:
    """Run each of ``tasks`` through the harness's ``HFLM`` wrapped around ``model`` (a ``PeftModel`` with the adapter
    to evaluate, or a bare base model) in eval mode; a task that raises is returned with its error.

    ``allow_code_execution``: tasks that run the model's generated code (humaneval, mbpp) are refused by the harness
    without it; with it, that code runs on this machine (the harness's ``confirm_run_unsafe_code``). ``lm``: a harness
    model already built around ``model`` (e.g. :class:`fedlm.inference.harness_lm.MixedHFLM` for a mix) in place of
    the plain ``HFLM``."""
    if allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # the `evaluate` code_eval metric's own opt-in
    import lm_eval  # noqa: PLC0415 - ~6 s import; only when a harness task runs
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415 - as above

    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size) if lm is None else lm
    outcomes = []
    try:
        for task in tasks:
            started = time.perf_counter()
            try:
                with torch.no_grad():
                    result = lm_eval.simple_evaluate(
                        model=lm,
                        tasks=[task],
                        task_manager=manager,
                        limit=limit,
                        num_fewshot=num_fewshot,
                        log_samples=keep_samples,
                        random_seed=None,  # fedlm's randomness is explicit: no global reseeding
                        numpy_random_seed=None,
                        torch_random_seed=None,
                        bootstrap_iters=1000,
                        confirm_run_unsafe_code=allow_code_execution,  # mean metrics (acc, acc_norm): closed-form stderr; the rest: 1000 draws
                    )
                outcomes.append(_outcome(task, result, time.perf_counter() - started))
            except Exception as exc:  # noqa: BLE001 - one task's failure (data, network, code) must not stop the others
                outcomes.append(TaskOutcome(task, seconds=time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}"))
    finally:
        model.train(was_training)
    return outcomes


def _outcome(task: str, result: dict[str, Any] | None, seconds: float) -> TaskOutcome:
    """The harness's result dict for one task (or group) as a :class:`TaskOutcome`."""
    if result is None:
        raise FedlmError(f"lm-eval returned no result for task {task!r}")
    results = result.get("results", {})
    entry: dict[str, Any] = results.get(task) or next(iter(results.values()), {})
    metrics = {}
    for key, value in entry.items():
        name, _, filt = key.partition(",")
        if not filt or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metrics[name if filt == "none" else f"{name},{filt}"] = float(value)
    n = result.get("n-samples", {}).get(task, {})
    num = int(n.get("effective", 0)) if isinstance(n, dict) else 0
    if not num:
        num = sum(int(v.get("effective", 0)) for v in result.get("n-samples", {}).values() if isinstance(v, dict))
    samples = []
    for sub, rows in (result.get("samples") or {}).items():
        for row in rows:
            scores = {k: row[k] for k in ("acc", "acc_norm", "exact_match") if isinstance(row.get(k), (int, float))}
            samples.append({"task": sub, "doc_id": row.get("doc_id"), **scores})
    return TaskOutcome(task, metrics, num, seconds, samples)


def save_outcomes(eval_dir: Path, model_label: str, outcomes: Sequence[TaskOutcome], about: dict[str, Any]) -> list[Path]:
    """Write (or update) ``eval_dir/<task>.json``: one entry per evaluated model (``global``, ``client <name>``,
    ``base <model>``, ...) with its metrics, documents, seconds and per-document scores, and ``about`` (model, dtype,
    limit, lm-eval version). Evaluating another model adds its entry beside the others."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for outcome in outcomes:
        path = eval_dir / f"{_file_name(outcome.task)}.json"
        data: dict[str, Any] = {"task": outcome.task, "models": {}}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                data = {"task": outcome.task, "models": {}}
        data.setdefault("models", {})[model_label] = {**about, **outcome.as_json()}
        path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
        written.append(path)
    return written


def _file_name(task: str) -> str:
    """A task name as a file name (the harness's names are already safe; anything else becomes ``_``)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in task)


def lm_eval_version() -> str:
    """The installed lm-evaluation-harness version."""
    return version("lm_eval")
