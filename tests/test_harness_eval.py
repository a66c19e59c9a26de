"""`fedlm eval` (lm-evaluation-harness) end to end on the tiny model, offline, with the shipped `wordnet_mc` task:
the global adapter, a client's personal adapter and a base model; the same numbers as the harness's own PEFT path;
bad input (unknown task, broken task folder, missing adapter) refused with what to do; a failing task does not stop
the others; `eval.harness` during training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config, write_config

from fedlm.cli import app
from fedlm.core.seeding import derive_seed
from fedlm.data.readers import EMBEDDED_DIR
from fedlm.evaluation.harness import check_task_names, include_paths, task_manager

LIMIT = 8
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """A one-round tiny run with its adapter."""
    from typer.testing import CliRunner

    tmp = tmp_path_factory.mktemp("harness")
    out = tmp / "run"
    cfg = write_config(tmp / "c.yaml", tiny_config(out, federation={"rounds": 1}, eval={"generate": False, "max_examples": 8}))
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    return out


def _models(run: Path, task: str = "wordnet_mc") -> dict:
    return json.loads((run / "eval" / f"{task}.json").read_text())["models"]


def test_shipped_task_files_are_what_the_build_script_writes(tmp_path: Path) -> None:
    folder = EMBEDDED_DIR / "wordnet_mc"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_wordnet_mc.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (folder / f"{split}.jsonl").read_bytes()
    test = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    defs = {json.loads(line)["word"] for line in (EMBEDDED_DIR / "wordnet_defs" / "train.jsonl").read_text().splitlines()}
    assert len(test) == 320 and all(len(r["choices"]) == 4 and len(set(r["choices"])) == 4 for r in test)
    assert all(r["choices"][r["label"]] == r["output"] for r in test)
    assert not {r["word"] for r in test} & defs  # held-out words only
    assert sum((folder / f).stat().st_size for f in ("train.jsonl", "test.jsonl")) < 1_000_000


def test_eval_global_client_and_base_rows(finished_run: Path, runner) -> None:
    result = runner.invoke(app, ["eval", str(finished_run), "--tasks", "wordnet_mc", "--limit", str(LIMIT)])
    assert result.exit_code == 0, result.output
    glob = _models(finished_run)["global"]
    assert glob["num_samples"] == LIMIT and 0.0 <= glob["metrics"]["acc_norm"] <= 1.0 and "acc_stderr" in glob["metrics"]
    assert len(glob["samples"]) == LIMIT and glob["dtype"] == "float32" and glob["adapter"].endswith("adapter")

    personal = finished_run / "clients" / "noun.food" / "adapter"
    personal.parent.mkdir(parents=True)
    shutil.copytree(finished_run / "adapter", personal)
    result = runner.invoke(app, ["eval", str(finished_run), "--tasks", "wordnet_mc", "--limit", str(LIMIT), "--client", "noun.food"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", str(finished_run), "--tasks", "wordnet_mc", "--limit", str(LIMIT), "--model-name", "tiny-random-llama"])
    assert result.exit_code == 0, result.output
    models = _models(finished_run)
    assert set(models) == {"global", "client noun.food", "base tiny-random-llama"}
    assert models["client noun.food"]["metrics"] == glob["metrics"]  # the same adapter, copied: the same numbers
    report = (finished_run / "report.md").read_text()
    section = report[report.index("## Standard benchmarks") :]
    assert "| base tiny-random-llama |" in section and "| global |" in section and "| client noun.food |" in section
    assert section.index("base tiny") < section.index("| global") and report.count("## Standard benchmarks") == 1


def test_same_numbers_as_the_harness_own_peft_loading(finished_run: Path, runner, tmp_path: Path) -> None:
    """Reference: lm-eval's HFLM loads the saved base model folder and the run's adapter through its own `peft=` path."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from fedlm.models.tiny import build_byte_tokenizer, build_tiny_llama

    result = runner.invoke(app, ["eval", str(finished_run), "--tasks", "wordnet_mc", "--limit", str(LIMIT)])
    assert result.exit_code == 0, result.output
    tokenizer = build_byte_tokenizer()
    build_tiny_llama(len(tokenizer), seed=derive_seed(0, "base-init") % 2**31).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    lm = HFLM(pretrained=str(tmp_path / "base"), peft=str(finished_run / "adapter"), device="cpu", dtype="float32", batch_size=8)
    reference = lm_eval.simple_evaluate(model=lm, tasks=["wordnet_mc"], task_manager=task_manager(include_paths()), limit=LIMIT)
    assert reference is not None
    ours = _models(finished_run)["global"]["metrics"]
    assert ours["acc"] == pytest.approx(reference["results"]["wordnet_mc"]["acc,none"])
    assert ours["acc_norm"] == pytest.approx(reference["results"]["wordnet_mc"]["acc_norm,none"])


def test_a_user_task_folder_runs_and_a_failing_task_does_not_stop_the_others(finished_run: Path, runner, tmp_path: Path) -> None:
    data = tmp_path / "tasks" / "colours.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"q": f"Colour {i}?", "choices": ["red", "green"], "label": i % 2}) + "\n" for i in range(6)))
    common = "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
    (tmp_path / "tasks" / "colours.yaml").write_text(
        f"task: my_colours\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n" + common
    )
    (tmp_path / "tasks" / "broken.yaml").write_text("task: my_broken\ncustom_dataset: !function broken_utils.load\n" + common)
    (tmp_path / "tasks" / "broken_utils.py").write_text("def load(**kwargs):\n    raise RuntimeError('the data server is down')\n")
    args = ["eval", str(finished_run), "--tasks", "my_broken,my_colours,wordnet_mc", "--limit", "4", "--include-path", str(tmp_path / "tasks")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "1 task(s) failed: my_broken" in result.output
    assert "the data server is down" in _models(finished_run, "my_broken")["global"]["error"]
    assert _models(finished_run, "my_colours")["global"]["num_samples"] == 4
    assert "failed: RuntimeError" in (finished_run / "report.md").read_text()


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("task: [unclosed", "is not valid YAML"),
        ("dataset_path: json\n", "field `task`"),
        ("task: t\noutput_type: multiple_choice\ndoc_to_choice: c\n", "field `dataset_path` is missing"),
        ("task: t\ndataset_path: json\noutput_type: choose\n", "field `output_type` must be one of"),
        ("task: t\ndataset_path: json\noutput_type: multiple_choice\n", "field `doc_to_choice` is missing"),
        ("task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: nowhere.jsonl}}\n", "`dataset_kwargs.data_files` names 'nowhere.jsonl'"),
    ],
)
def test_a_broken_task_folder_names_the_file_and_the_field(finished_run: Path, runner, tmp_path: Path, yaml_text: str, expected: str) -> None:
    (tmp_path / "bad.yaml").write_text(yaml_text)
    result = runner.invoke(app, ["eval", str(finished_run), "--tasks", "wordnet_mc", "--include-path", str(tmp_path)])
    assert result.exit_code == 2 and expected in result.output and "bad.yaml" in result.output.replace("\n", "")


def test_unknown_task_lists_the_closest_names() -> None:
    from fedlm.core.errors import FedlmError

    manager = task_manager(include_paths())
    with pytest.raises(FedlmError, match=r"'wordnet_m' is not known.*closest known: wordnet_mc"):
        check_task_names(["wordnet_m"], manager)
    with pytest.raises(FedlmError, match=r"'arc_eazy'.*arc_easy"):
        check_task_names(["arc_eazy"], manager)


def test_missing_adapter_personal_model_or_run_is_refused_with_what_to_do(finished_run: Path, runner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", str(finished_run), "--tasks", "wordnet_mc", "--client", "noun.plant"])
    assert result.exit_code == 2 and "client 'noun.plant' has no personal model" in result.output
    assert "evaluate the global model without --client" in result.output.replace("\n", " ")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(finished_run / "config.yaml", unfinished / "config.yaml")
    result = runner.invoke(app, ["eval", str(unfinished), "--tasks", "wordnet_mc"])
    assert result.exit_code == 2 and "has no adapter/" in result.output and "--resume" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path / "nothing"), "--tasks", "wordnet_mc"])
    assert result.exit_code == 2 and "holds no fedlm run" in result.output and "--model-name" in result.output
    result = runner.invoke(app, ["eval", str(finished_run), "--tasks", "wordnet_mc", "--mix", "adapter"])
    assert result.exit_code == 2 and "--client NAME" in result.output
    result = runner.invoke(app, ["eval", str(finished_run), "--tasks", "wordnet_mc", "--mix", "logits", "--client", "noun.plant"])
    assert result.exit_code == 2 and "'noun.plant'" in result.output and "personal" in result.output  # the client is named


def test_mixes_under_the_harness(tmp_path: Path, runner, one_torch_thread: None) -> None:
    """`--mix`: the harness scores the inference phase's mixed model. References: `--mix local` of a `replace` client is
    the harness's plain path on that client's adapter (`--client`), `--mix global` the plain global row; the logits
    mix is w p_local + (1 - w) p_global at every position; generation under a mix equals transformers' greedy `generate`."""
    import torch
    from inference_fixtures import add_clients, tiny_run

    from fedlm.inference.harness_lm import MixedHFLM
    from fedlm.inference.mix import MixedModel, MixSpec
    from fedlm.inference.run import open_run

    run = tiny_run(tmp_path, runner)
    add_clients(run)
    base = ["eval", str(run), "--tasks", "wordnet_mc", "--limit", str(LIMIT)]
    assert runner.invoke(app, base).exit_code == 0
    plain_global = _models(run)["global"]
    for extra in (["--client", "alice"], ["--mix", "local", "--client", "alice"], ["--mix", "global"], ["--mix", "logits", "--client", "alice"]):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 0, result.output
    models = _models(run)
    assert models["client alice local"]["metrics"] == models["client alice"]["metrics"]
    assert models["global"]["metrics"] == plain_global["metrics"] and models["global"]["mix"]["mix"] == "global"
    assert models["client alice logits"]["mix"] == {"mix": "logits", "client": "alice", "weight": 0.5, "max_weight": 1.0, "combine": "linear"}
    assert [r["doc_id"] for r in models["client alice logits"]["samples"]] == [r["doc_id"] for r in models["global"]["samples"]]
    mixed = MixedModel(open_run(run))
    lm = MixedHFLM(mixed, MixSpec(mix="logits", client="alice"), batch_size=2)
    ids = torch.tensor([[5, 9, 23, 44, 3, 17]])
    personal = mixed.logprobs(MixSpec(mix="local", client="alice"), ids, torch.ones_like(ids))
    glob = mixed.logprobs(MixSpec(), ids, torch.ones_like(ids))
    expected = torch.log(0.5 * personal.exp() + 0.5 * glob.exp())
    torch.testing.assert_close(lm._model_call(ids), expected, rtol=1e-5, atol=1e-5)
    greedy = MixedHFLM(mixed, MixSpec(), batch_size=2)._model_generate(ids, max_length=ids.shape[1] + 5, stop=[])
    reference = mixed.run.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert greedy[0, : reference.shape[1]].tolist() == reference[0].tolist()


def test_eval_harness_every_round_gives_benchmark_curves(tmp_path: Path, runner, one_torch_thread: None) -> None:
    out = tmp_path / "run"
    harness = {"tasks": ["wordnet_mc"], "limit": 4, "every": 1}
    cfg = write_config(tmp_path / "c.yaml", tiny_config(out, eval={"generate": False, "max_examples": 8, "harness": harness}))
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    harness_records = [r for r in records if r["split"] == "harness"]
    assert [r["round"] for r in harness_records] == [0, 1, 2]
    assert all(r["task"] == "wordnet_mc" and r["metric"] == "acc_norm" and r["num_examples"] == 4 for r in harness_records)
    assert (out / "plots" / "harness.png").is_file() and "wordnet_mc (acc_norm)" in (out / "report.md").read_text()


def test_eval_harness_unknown_task_fails_before_training(tmp_path: Path, runner) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", eval={"harness": {"tasks": ["wordnet_mcq"]}}))
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2 and "`eval.harness.tasks`" in result.output and "wordnet_mc" in result.output
    assert not (tmp_path / "run" / "metrics.jsonl").is_file() or "train" not in (tmp_path / "run" / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_smollm2_run_then_eval_global_and_base(tmp_path: Path, runner) -> None:
    """The whole path on the real default model, offline: a short federated run, then the shipped task on its global
    adapter and on the base model, both rows in the report."""
    out = tmp_path / "run"
    config = tiny_config(
        out,
        model={"name": "smollm2-135m-instruct", "dtype": "float32"},
        federation={"rounds": 1, "clients_per_round": 2, "local_steps": 2, "batch_size": 4, "lr": 0.0002},
        eval={"generate": False, "max_examples": 8, "at_start": False},
    )
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 0, result.output
    for extra in ([], ["--model-name", "smollm2-135m-instruct"]):
        result = runner.invoke(app, ["eval", str(out), "--tasks", "wordnet_mc", "--limit", "40", *extra])
        assert result.exit_code == 0, result.output
    models = _models(out)
    assert set(models) == {"global", "base smollm2-135m-instruct"}
    for entry in models.values():
        assert entry["num_samples"] == 40 and 0.0 <= entry["metrics"]["acc_norm"] <= 1.0
    # two steps of two clients at lr 2e-4 barely move the adapter: the global model scores near the base model
    assert abs(models["global"]["metrics"]["acc_norm"] - models["base smollm2-135m-instruct"]["metrics"]["acc_norm"]) <= 0.1
