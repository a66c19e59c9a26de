"""Reading example records from JSON, JSONL, CSV and Parquet files, ``datasets.save_to_disk`` folders,
plain-text documents (a ``.txt`` file, or a folder of them: one record ``{text, file, folder}`` per file, for
``objective: clm``), the datasets embedded in fedlm (``embedded:<name>``) and Hugging Face hub datasets
(``owner/name`` or ``owner/name:split``, default split ``train``, through ``datasets.load_dataset``: a network or the
hub cache is needed, which is the user's business; fedlm's tests never download)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlm.core.errors import FedlmError

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DIR = Path(__file__).parent / "embedded"
Record = dict[str, Any]


def embedded_path(spec: str) -> Path:
    """``embedded:wordnet_defs`` -> its train file; ``embedded:wordnet_defs/test`` -> its test file."""
    name = spec.removeprefix(EMBEDDED_PREFIX)
    dataset, _, split = name.partition("/")
    path = EMBEDDED_DIR / dataset / f"{split or 'train'}.jsonl"
    if not path.is_file():
        known = sorted(p.name for p in EMBEDDED_DIR.iterdir() if p.is_dir())
        raise FedlmError(f"embedded dataset {spec!r} does not exist; known: {', '.join(known)} (add /test for the test split)")
    return path


def read_records(source: str, field_name: str = "data.train") -> list[Record]:
    """Read every record of ``source`` (a file, a ``load_from_disk`` folder, or ``embedded:<name>``).

    Raises:
        FedlmError: the path does not exist, its format is unknown, or it holds no records.
    """
    path = embedded_path(source) if source.startswith(EMBEDDED_PREFIX) else Path(source).expanduser()
    if not path.exists() and is_hub_id(source):
        records = load_hub_dataset(*hub_id_and_split(source), field_name)
        if not records:
            raise FedlmError(f"`{field_name}`: hub dataset {source!r} holds no examples")
        return records
    if not path.exists():
        raise FedlmError(f"`{field_name}`: {source!r} does not exist; give a .json/.jsonl/.csv/.parquet/.txt file or a dataset folder")
    if path.is_dir():
        records = _read_text_folder(path) if _is_text_folder(path) else _read_saved_dataset(path, field_name)
    else:
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_text}
        if suffix not in readers:
            raise FedlmError(f"`{field_name}`: unknown file type {suffix!r} for {source!r}; use .json, .jsonl, .csv, .parquet or .txt")
        records = readers[suffix](path, field_name)
    if not records:
        raise FedlmError(f"`{field_name}`: {source!r} holds no examples")
    return records


_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


def is_hub_id(source: str) -> bool:
    """``owner/name`` or ``owner/name:split``: one slash, not a path (no leading ``.``, ``/``, ``~``), no file suffix."""
    name = source.split(":", 1)[0]
    return (
        name.count("/") == 1
        and not name.startswith((".", "/", "~"))
        and all(name.split("/"))
        and not name.lower().endswith(_FILE_SUFFIXES)
        and not source.startswith(EMBEDDED_PREFIX)
    )


def hub_id_and_split(source: str) -> tuple[str, str]:
    """``owner/name:split`` -> (``owner/name``, ``split``); the split defaults to ``train``."""
    name, _, split = source.partition(":")
    return name, split or "train"


def load_hub_dataset(repo_id: str, split: str, field_name: str) -> list[Record]:
    """The hub boundary: one split of a hub dataset as records (``datasets.load_dataset``, its cache, its network)."""
    from datasets import load_dataset  # noqa: PLC0415 - heavy; only for hub datasets

    try:
        data = load_dataset(repo_id, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated, missing split: one line with the reason
        raise FedlmError(
            f"`{field_name}`: {repo_id!r} is no local path, and as a hub dataset (split {split!r}) it could not be loaded: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; check the path, or the id and your network / HF cache"
        ) from None
    return data.to_list()


def _read_jsonl(path: Path, field_name: str) -> list[Record]:
    records = []
    with path.open() as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FedlmError(f"`{field_name}`: {path} line {line_no} is not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise FedlmError(f"`{field_name}`: {path} line {line_no} is not a JSON object")
            records.append(record)
    return records


def _read_json(path: Path, field_name: str) -> list[Record]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FedlmError(f"`{field_name}`: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise FedlmError(f'`{field_name}`: {path} must hold a JSON list of objects (or {{"data": [...]}})')
    return data


def _read_csv(path: Path, field_name: str) -> list[Record]:
    import pandas as pd  # noqa: PLC0415 - heavy; only for CSV files

    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    return frame.to_dict(orient="records")


def _read_parquet(path: Path, field_name: str) -> list[Record]:
    import pyarrow.parquet as pq  # noqa: PLC0415 - heavy; only for Parquet files

    return pq.read_table(path).to_pylist()


def _read_text(path: Path, field_name: str) -> list[Record]:
    return [{"text": path.read_text(encoding="utf-8"), "file": path.name, "folder": "."}]


def _is_text_folder(path: Path) -> bool:
    """A folder of ``.txt`` documents rather than a ``datasets.save_to_disk`` folder."""
    saved = any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))
    return not saved and any(path.rglob("*.txt"))


def _read_text_folder(path: Path) -> list[Record]:
    """One record per ``.txt`` file under ``path`` (sorted): its text, its path and its sub-folder (a field to
    partition by, e.g. one folder per organisation or domain)."""
    records = []
    for file in sorted(path.rglob("*.txt")):
        rel = file.relative_to(path)
        records.append({"text": file.read_text(encoding="utf-8"), "file": str(rel), "folder": str(rel.parent)})
    return records


def _read_saved_dataset(path: Path, field_name: str) -> list[Record]:
    from datasets import Dataset, DatasetDict, load_from_disk  # noqa: PLC0415 - heavy; only for saved datasets

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError:
        raise FedlmError(f"`{field_name}`: folder {str(path)!r} is not a datasets.save_to_disk folder") from None
    if isinstance(data, DatasetDict):
        split = "train" if "train" in data else next(iter(data))
        data = data[split]
    if not isinstance(data, Dataset):
        raise FedlmError(f"`{field_name}`: folder {str(path)!r} does not hold a dataset")
    return data.to_list()
