"""Local data of the ``wordnet_mc`` lm-eval task: the JSONL files next to this file, nothing downloaded."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_splits(**_: object) -> datasets.DatasetDict:
    """The train and test splits as a ``DatasetDict`` (the harness passes its metadata as keyword arguments)."""
    files = {split: str(HERE / f"{split}.jsonl") for split in ("train", "test")}
    return datasets.load_dataset("json", data_files=files)
