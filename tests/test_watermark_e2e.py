"""The watermark end to end through the CLI on the tiny model: a run whose server marks the global adapter and
each client's copy, then `fedlm watermark verify` (run, adapter and merged folders; right and wrong key) and
`fedlm watermark trace` (a client's copy names it; the global model names nobody), and bad input as one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_config, write_config
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from fedlm.cli import app
from fedlm.models.tiny import build_byte_tokenizer
from fedlm.watermark.trace import read_registry

pytestmark = pytest.mark.slow  # the run trains ~240 steps of marks (about a minute on 2 busy cores)

SECRET = "k3y"
# LoRA on lm_head too: the tiny random model's own head gives logits within about +-1, too flat to learn triggers fast
# the published WAFFLE re-embedding, without the defaults' pre-training, retain set and `until`: on the tiny random
# model the distillation of 64 conversations' answer tokens drowns the triggers, and after the pre-training its copies
# do not learn their own sets in 40 steps (SmolLM2 does, benchmarks/lifelong_watermark.py; test_watermark_cli and
# test_watermark_until cover those settings)
WATERMARK = {
    "secret": SECRET,
    "size": 8,
    "steps": 40,
    "lr": 0.01,
    "per_client": True,
    "client_size": 6,
    "client_steps": 40,
    "start_steps": 0,
    "retain": 0,
    "until": None,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    tmp = tmp_path_factory.mktemp("watermark")
    config = tiny_config(
        tmp / "run",
        peft={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS},
        data={"max_train_examples": 40, "max_length": 96},
        partition={"method": "iid", "num_clients": 2, "field": None},
        federation={"rounds": 2, "clients_per_round": 1, "local_steps": 2, "batch_size": 4, "lr": 0.003},
        eval={"max_examples": 4, "max_new_tokens": 2, "batch_size": 4, "at_start": False},
        watermark=WATERMARK,
    )
    result = CliRunner().invoke(app, ["run", str(write_config(tmp / "c.yaml", config))])
    assert result.exit_code == 0, result.output
    return tmp / "run"


def _cli(*args: str) -> tuple[int, str]:
    """Exit code and what was printed: the result on stdout, or the one `error:` line on stderr."""
    result = CliRunner().invoke(app, ["watermark", *args])
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.output
        return 2, errors[0]
    return result.exit_code, result.stdout


def test_the_run_marks_the_global_model_and_keeps_each_clients_copy(run: Path) -> None:
    assert read_registry(run) == {"clients": ["0", "1"], "size": 8, "client_size": 6, "keys": "HMAC-SHA256(secret, 'client/<name>')"}
    assert (run / "watermark" / "0" / "adapter_config.json").is_file() and (run / "watermark" / "1" / "adapter_model.safetensors").is_file()
    code, out = _cli("verify", str(run), "--secret", SECRET)
    assert code == 0 and out.startswith("watermark present"), out
    code, out = _cli("verify", str(run), "--secret", "not-the-key")  # a wrong key is an honest result, not an error
    assert code == 0 and out.startswith("watermark not found"), out


def test_trace_names_the_client_whose_copy_leaked_and_nobody_for_the_global_model(run: Path) -> None:
    code, out = _cli("trace", str(run / "watermark" / "1"), "--secret", SECRET)
    assert code == 0 and "leaked copy of client 1" in out, out
    code, out = _cli("trace", str(run), "--secret", SECRET)  # the aggregation never saw a client's mark
    assert code == 0 and "no client's mark found" in out, out


def test_the_mark_survives_export_merge(run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "merged"), "--merge"])
    assert result.exit_code == 0, result.output
    code, out = _cli("verify", str(tmp_path / "merged"), "--secret", SECRET, "--size", "8")
    assert code == 0 and out.startswith("watermark present") and "(model)" in out, out


def test_bad_input_is_one_line(run: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, out = _cli("verify", str(tmp_path / "empty"), "--secret", SECRET)
    assert code == 2 and "neither a fedlm run folder" in out, out
    other = tmp_path / "other-base"  # a model of another shape: the adapter does not fit it
    tokenizer = build_byte_tokenizer()
    LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(other)
    tokenizer.save_pretrained(other)
    code, out = _cli("verify", str(run / "watermark" / "0"), "--secret", SECRET, "--model", str(other))
    assert code == 2 and "does not fit base model" in out, out
    code, out = _cli("trace", str(tmp_path / "other-base"), "--secret", SECRET)
    assert code == 2 and "no clients to test" in out, out
