"""Checking a user's lm-evaluation-harness task folder (YAML + local data) before the harness reads it, so that a
broken file is refused with its path and the field at fault instead of a harness traceback mid-evaluation.

The checks are those of the harness's ``TaskConfig`` that fedlm can make without importing it: the file is YAML
holding a mapping; a task names itself (``task``), says where its documents come from (``dataset_path`` or
``custom_dataset``, or inherits them through ``include``), has a known ``output_type``, and a multiple-choice task
says what its choices are; local ``data_files`` exist. ``!function`` tags are accepted as written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fedlm.core.errors import FedlmError

OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")


class _TaskLoader(yaml.SafeLoader):
    """A safe YAML loader that keeps the harness's ``!function module.name`` tags as strings."""


_TaskLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def check_task_folder(folder: Path) -> None:
    """Refuse a folder that is missing, holds no task YAML, or whose YAML is not a valid task (file and field named)."""
    folder = folder.expanduser()
    if not folder.is_dir():
        raise FedlmError(f"`--include-path` {str(folder)!r} is not a folder; give a folder of lm-eval task YAML files")
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    if not files:
        raise FedlmError(f"`--include-path` {str(folder)!r} holds no .yaml task file; an lm-eval task is a YAML file (task, dataset_path, ...)")
    for path in files:
        check_task_file(path)


def check_task_file(path: Path) -> None:
    """Refuse one task YAML that cannot work, naming the file and the field."""
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise FedlmError(f"lm-eval task file {path} is not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise FedlmError(f"lm-eval task file {path} must hold a mapping of fields (task, dataset_path, ...), got {type(config).__name__}")
    if "task" not in config:
        if "group" in config:
            return  # a group file: its tasks are checked in their own files
        raise FedlmError(f"lm-eval task file {path}: field `task` (the task's name) is missing")
    if isinstance(config["task"], list):
        return  # a group listing its tasks
    if not isinstance(config["task"], str) or not config["task"].strip():
        raise FedlmError(f"lm-eval task file {path}: field `task` must be the task's name, got {config['task']!r}")
    if "include" in config:
        return  # fields inherited from the included file, which the harness resolves
    if not config.get("dataset_path") and not config.get("custom_dataset"):
        raise FedlmError(
            f"lm-eval task file {path}: field `dataset_path` is missing (e.g. `dataset_path: json` with "
            "`dataset_kwargs: {data_files: {test: /abs/path/test.jsonl}}`, or `custom_dataset: !function utils.load`)"
        )
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise FedlmError(f"lm-eval task file {path}: field `output_type` must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if output_type == "multiple_choice" and "doc_to_choice" not in config:
        raise FedlmError(f"lm-eval task file {path}: field `doc_to_choice` is missing; a multiple_choice task must say its choices")
    _check_data_files(path, config.get("dataset_kwargs"))


def _check_data_files(path: Path, kwargs: Any) -> None:
    """Local ``dataset_kwargs.data_files`` must exist (relative paths are read from the working directory, as
    ``datasets.load_dataset`` does)."""
    if not isinstance(kwargs, dict) or kwargs.get("data_files") is None:
        return
    files = kwargs["data_files"]
    values = files.values() if isinstance(files, dict) else [files]
    for value in values:
        for entry in value if isinstance(value, list) else [value]:
            text = str(entry)
            if "://" in text or any(ch in text for ch in "*?["):
                continue  # remote or a glob: the harness's business
            if not Path(text).expanduser().exists():
                beside = path.parent / text
                hint = f"; it is next to the YAML: write {beside.resolve()}" if beside.exists() else ""
                raise FedlmError(
                    f"lm-eval task file {path}: field `dataset_kwargs.data_files` names {text!r}, which does not exist "
                    f"(relative paths are read from the working directory){hint}"
                )
