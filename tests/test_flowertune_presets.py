"""The FlowerTune presets (`examples/flowertune/*.yaml`) load, carry FlowerTune's published set-up, and resolve their
model, data and evaluation tasks with only the hub boundary mocked: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedlm.config.io import load_config
from fedlm.core.errors import FedlmError
from fedlm.data import readers
from fedlm.data.prepare import load_split_records
from fedlm.evaluation.harness import check_task_names, include_paths, task_manager
from fedlm.models.loading import resolve_model_source
from fedlm.objectives import build_objective

PRESETS = sorted((Path(__file__).resolve().parents[1] / "examples" / "flowertune").glob("*.yaml"))
DATASETS = {
    "general-nlp": "vicgalle/alpaca-gpt4",
    "finance": "FinGPT/fingpt-sentiment-train",
    "medical": "medalpaca/medical_meadow_medical_flashcards",
    "code": "flwrlabs/code-alpaca-20k",
}
TASKS = {
    "general-nlp": ["mmlu_stem", "mmlu_social_sciences", "mmlu_humanities"],
    "finance": None,
    "medical": ["pubmedqa", "medmcqa", "medqa_4options"],
    "code": ["humaneval", "mbpp"],
}


def test_every_challenge_has_a_preset() -> None:
    assert [p.stem for p in PRESETS] == sorted(DATASETS)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_flowertunes_setup(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(path)
    fed = config.federation
    assert (config.model.quantization, config.peft.method, config.peft.r, config.peft.alpha) == ("4bit", "lora", 32, 64.0)
    assert (config.partition.method, config.partition.num_clients, fed.clients_per_round) == ("iid", 20, 2)
    assert (fed.rounds, fed.local_steps, fed.batch_size, config.data.max_length) == (200, 10, 16, 512)
    assert (fed.lr, fed.lr_schedule, config.aggregation.name) == (5e-5, "cosine", "fedavg")
    assert fed.lr * fed.min_lr_ratio == pytest.approx(1e-6)
    assert resolve_model_source(config.model.name) == config.model.name  # a hub id, handed to from_pretrained as it is

    asked: list[tuple[str, str]] = []

    def hub(repo_id: str, split: str, field_name: str) -> list[dict[str, Any]]:  # the hub boundary
        asked.append((repo_id, split))
        return [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(300)]

    monkeypatch.setattr(readers, "load_hub_dataset", hub)
    train, test = load_split_records(config.data, config.seed)
    assert asked == [(DATASETS[path.stem], "train")] and len(test) == 3 and len(train) == 297
    build_objective(config.objective.name).check_records(train, "data.train", config.data)

    tasks = TASKS[path.stem]
    if tasks is None:
        assert config.eval.harness is None
    else:
        assert config.eval.harness is not None and config.eval.harness.tasks == tasks
        assert check_task_names(tasks, task_manager(include_paths())) == tasks  # known to the pinned lm-eval


def test_hub_ids_and_paths_are_told_apart() -> None:
    assert readers.is_hub_id("vicgalle/alpaca-gpt4") and readers.is_hub_id("owner/name:validation")
    assert readers.hub_id_and_split("owner/name:validation") == ("owner/name", "validation")
    for path in ("data/train.jsonl", "/abs/x", "./a/b", "a/b/c", "embedded:wordnet_defs/test", "plain"):
        assert not readers.is_hub_id(path), path


def test_unreachable_hub_dataset_is_one_line_naming_the_field() -> None:
    with pytest.raises(FedlmError, match=r"`data.train`: 'fedlm-nobody/no-such-dataset' is no local path.*network"):
        readers.read_records("fedlm-nobody/no-such-dataset", "data.train")
