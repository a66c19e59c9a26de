"""Multiple-choice accuracy in fedlm's evaluator (against lm-eval's own log-likelihoods), the clm held-out packing,
labelled progress bars, plots (per-client loss curves, bounded axes) and config spelling hints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedlm.config import DataConfig, EvalConfig, PartitionConfig, PeftConfig
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.data.choices import check_choices
from fedlm.data.prepare import prepare_federated_data
from fedlm.evaluation.evaluator import Evaluator
from fedlm.evaluation.multiple_choice import Question, build_question, choice_logliks, predicted_choice
from fedlm.models.adapters import attach_adapter
from fedlm.models.tiny import build_byte_tokenizer, build_tiny_llama
from fedlm.objectives import build_objective
from fedlm.reporting import plots

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_byte_tokenizer()
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    return attach_adapter(build_tiny_llama(len(tokenizer), seed=3), PeftConfig(r=2), seed=0).eval()


def test_choice_logliks_equal_lm_eval_loglikelihood(model, tokenizer) -> None:
    """Reference: lm-eval's HFLM.loglikelihood on (chat-template prompt, rendered answer) pairs. The harness moves a
    context's trailing whitespace (the template's newline after the assistant header) into the continuation, so the
    answer's log-likelihood is its request minus the request for that newline alone (chain rule)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    prompt = [{"role": "user", "content": 'What does the noun "fudge" mean?'}]
    choices = ["soft creamy candy", "a large boat", "x"]
    question = build_question(tokenizer, prompt, {"choices": choices, "label": 0}, 256)
    assert question is not None
    ours = choice_logliks(model, [question], tokenizer.pad_token_id, torch.device("cpu"), batch_size=2)[0]
    context = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    stripped = context.rstrip()
    requests = [Instance("loglikelihood", {}, (stripped, context[len(stripped) :]), 0)]
    for i, choice in enumerate(choices):
        full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": choice}], tokenize=False)
        requests.append(Instance("loglikelihood", {}, (stripped, full[len(stripped) :]), i + 1))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    header, *answers = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    reference = [ll - header for ll in answers]
    assert ours == pytest.approx(reference, abs=1e-4)


def test_prediction_is_the_best_loglik_per_character() -> None:
    question = Question(answers=[], lengths=[10, 3, 12], label=2)
    assert predicted_choice(question, [-10.0, -6.0, -9.0]) == 2  # -1.0, -2.0, -0.75 per character
    assert predicted_choice(question, [-1.0, -6.0, -30.0]) == 0


def test_evaluator_reports_mc_accuracy_globally_and_per_client(model, tokenizer) -> None:
    data = DataConfig(train="embedded:wordnet_defs", test="embedded:wordnet_mc/test", max_train_examples=80, max_length=96)
    fed = prepare_federated_data(data, PartitionConfig(), EvalConfig(max_examples=24), tokenizer, 0, objective=build_objective("sft"))
    evaluator = Evaluator(model, tokenizer, fed.test, EvalConfig(generate=False, batch_size=8), torch.device("cpu"), 96)
    result = evaluator.evaluate(None, 0)
    rows = result.predictions
    assert all(row["mc_correct"] == float(row["mc_choice"] == row["label"]) for row in rows)
    by_split = {r["split"]: r for r in result.records}
    assert by_split["global_test"]["mc_accuracy"] == pytest.approx(sum(r["mc_correct"] for r in rows) / len(rows))
    for client in {row["client"] for row in rows}:
        mine = [r["mc_correct"] for r in rows if r["client"] == client]
        assert by_split[f"client_{client}_test"]["mc_accuracy"] == pytest.approx(sum(mine) / len(mine))


@pytest.mark.parametrize(
    ("record", "message"),
    [({"choices": "a", "label": 0}, "two or more"), ({"choices": ["a", "b"], "label": 2}, "index"), ({"choices": ["a", "b"]}, "`label`")],
)
def test_bad_choices_name_the_example(record: dict[str, Any], message: str) -> None:
    with pytest.raises(FedlmError, match=message):
        check_choices(record, "`data.test` example 3")


def test_clm_global_test_set_packs_all_documents_and_shares_only_full_blocks(tokenizer) -> None:
    """The measured case: 847 tokens of held-out text over 6 clients and block 256 gives 3 global blocks, and no client
    share (each client has under 256 tokens), instead of a false "fewer than one block" refusal."""
    objective = build_objective("clm", {"block_size": 256})
    texts = ["x" * 140] * 5 + ["y" * 141]  # 6 documents: 5 x 141 + 142 = 847 tokens with EOS (byte tokenizer)
    records = [{"text": t} for t in texts]
    owners = [f"c{i}" for i in range(6)]
    test = objective.test_examples(records, tokenizer, DataConfig(max_length=256), owners, "data.test")
    assert len(test) == 3 and all(ex.in_global and ex.client is None for ex in test)  # 847 // 256
    owners = ["big"] * 4 + ["c4", "c5"]  # "big" has 564 tokens: two blocks of its own; c4 and c5 none
    test = objective.test_examples(records, tokenizer, DataConfig(max_length=256), owners, "data.test")
    assert [ex.client for ex in test if not ex.in_global] == ["big", "big"] and sum(ex.in_global for ex in test) == 3
    with pytest.raises(FedlmError, match=r"all 2 held-out document\(s\) together give 12 tokens"):
        objective.test_examples([{"text": "abcde"}] * 2, tokenizer, DataConfig(max_length=256), ["a", "b"], "data.test")


class _Bars:
    """A stand-in for the rich progress bars: records each bar's description and whether it was removed."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.removed = 0

    def task(self, description: str, total: int) -> Any:
        self.opened.append(description)
        outer = self

        class Bar:
            def advance(self, amount: int = 1) -> None:
                pass

            def done(self) -> None:
                outer.removed += 1

        return Bar()


def test_progress_bars_name_the_model_and_are_removed_when_done(model, tokenizer) -> None:
    data = DataConfig(train="embedded:wordnet_defs", test="embedded:wordnet_mc/test", max_train_examples=40, max_length=96)
    fed = prepare_federated_data(data, PartitionConfig(), EvalConfig(max_examples=8), tokenizer, 0, objective=build_objective("sft"))
    bars = _Bars()
    config = EvalConfig(max_new_tokens=2, batch_size=8)
    Evaluator(model, tokenizer, fed.test, config, torch.device("cpu"), 96, bars).evaluate(None, 0, "local-only noun.food")  # type: ignore[arg-type]
    assert bars.opened == ["local-only noun.food: loss", "local-only noun.food: generate", "local-only noun.food: choices"]
    assert bars.removed == len(bars.opened)


def _captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Plot through fedlm's plots module, keeping each figure's curve labels and y-limits."""
    seen: dict[str, Any] = {}
    original = plots._finish

    def finish(fig, ax, ylabel, title, path):
        seen[Path(path).stem] = {"labels": [line.get_label() for line in ax.get_lines()], "ylim": ax.get_ylim()}
        return original(fig, ax, ylabel, title, path)

    monkeypatch.setattr(plots, "_finish", finish)
    return seen


def test_loss_plot_has_client_curves_and_bounded_metrics_stay_in_0_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _captured(monkeypatch)
    records = []
    for rnd in range(3):
        records.append({"round": rnd, "split": "global_test", "client": None, "loss": 3.0 - rnd, "rouge_l": 0.02, "exact_match": 0.0})
        for c in ("a", "b"):
            records.append({"round": rnd, "split": f"client_{c}_test", "client": c, "loss": 3.1 - rnd, "rouge_l": 0.02, "exact_match": 0.0})
            if rnd:
                records.append({"round": rnd, "split": "train", "client": c, "loss": 2.9 - rnd})
    plots.plot_metrics(records, tmp_path)
    assert {"a test", "b test", "a train", "b train", "global_test loss", "mean client train loss"} <= set(seen["loss"]["labels"])
    for metric in ("rouge_l", "exact_match"):
        low, high = seen[metric]["ylim"]
        assert low == 0.0 and 0.0 < high <= 1.02
        assert seen[metric]["labels"][0] == "global_test"  # drawn first: underneath the client curves


@pytest.mark.parametrize(
    ("raw", "hint"),
    [
        ({"federation": {"round": 3}}, "did you mean `federation.rounds`?"),
        ({"seeds": 1}, "did you mean `seed`?"),
        ({"eval": {"harness": {"tasks": ["wordnet_mc"], "evry": 2}}}, "did you mean `eval.harness.every`?"),
        ({"federation": {"zzzz": 1}}, "remove it or check its spelling"),
    ],
)
def test_unknown_config_key_suggests_the_close_name(raw: dict[str, Any], hint: str) -> None:
    with pytest.raises(FedlmError) as err:
        validate_config(raw)
    assert hint in str(err.value)


def test_side_by_side_shows_the_federated_gains_first_with_a_fixed_seed() -> None:
    from fedlm.reporting.side_by_side import pick_examples, side_by_side_markdown

    def rows(correct: list[int]) -> list[dict[str, Any]]:
        return [
            {"prompt": f"q{i}", "reference": "right", "client": "a", "choices": ["right", "wrong"], "mc_choice": 1 - c, "mc_correct": float(c)}
            for i, c in enumerate(correct)
        ]

    arms = {"base": rows([0, 0, 1, 0, 1, 0]), "federated": rows([1, 0, 1, 1, 0, 0])}
    picked = pick_examples(arms, 4, seed=7, text_score=lambda p, r: 0.0)
    assert sorted(picked[:2]) == [0, 3] and len(set(picked)) == 4  # the two gains first
    assert picked == pick_examples(arms, 4, seed=7, text_score=lambda p, r: 0.0)
    table = side_by_side_markdown(arms, {"a": rows([1] * 6), "b": rows([0] * 6), "c": rows([1, 0, 0, 1, 0, 0])}, 2, 7, lambda p, r: 0.0)
    assert table is not None and table.count("\n") == 3 and "right (right)" in table and "wrong (wrong)" in table
    # the two gains (questions 0 and 3, client a's): a's own model is right; of the other two models only c is
    assert "local-only (other clients)" in table and table.count("| 1 of 2 right |") == 2
    from fedlm.reporting.side_by_side import first_sentence

    question = 'Which category does the noun "bite" belong to? Answer with one word: animal, artifact or food.'
    assert first_sentence(question, 70) == 'Which category does the noun "bite" belong to?'
    assert first_sentence("x" * 100, 20) == "x" * 19 + "…"


def test_compare_on_the_mc_test_set_reports_mc_accuracy_and_shows_questions(tmp_path: Path, runner) -> None:
    from conftest import tiny_config, write_config

    from fedlm.cli import app

    out = tmp_path / "cmp"
    data = {"test": "embedded:wordnet_mc/test"}
    cfg = write_config(tmp_path / "c.yaml", tiny_config(out, data=data, federation={"rounds": 1}, eval={"max_examples": 16, "max_new_tokens": 4}))
    result = runner.invoke(app, ["compare", str(cfg)])
    assert result.exit_code == 0, result.output
    markdown = (out / "comparison.md").read_text()
    assert "| method | loss | perplexity | rouge_l | exact_match | mc_accuracy |" in markdown
    section = markdown[markdown.index("5 held-out questions") :]
    assert section.count("\n| ") == 7  # header, separator, 5 questions
