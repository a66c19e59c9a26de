"""``fedlm export --merge RUN_DIR OUT_DIR``: fold a run's final adapter into the base weights (peft's
``merge_and_unload``) and save a plain Hugging Face model folder, which ``model.name: OUT_DIR`` loads as a base model.

LoRA, DoRA and IA3 merge exactly (up to float rounding); prompt and prefix tuning have no weights to merge into;
a ``full`` run's ``adapter/`` already is a full model folder.

The merge is computed and saved in float32, whatever ``model.dtype`` the run trained in: the base model is loaded in
float32 (exact for bfloat16 checkpoints), the float32 adapter is folded in, and the folder's weights and
``config.json`` dtype are float32. Merging into bfloat16 weights would round W + s B A to bfloat16 (8 significant
bits), which erases the part of an adapter's change below a weight's rounding step; a small late-training update can
vanish entirely. Load the folder in bfloat16 (``model.dtype``) to compute in it: that rounds once, at load.

A run trained on a quantized base (``model.quantization: 4bit|8bit``, QLoRA) is merged into the de-quantized,
full-precision float32 base, as the QLoRA authors merge: 4-bit blocks cannot hold W + s B A. The merged model then
differs from the one trained by the base's quantization error (the adapter learned on the quantized weights);
quantize the merged folder again (``model.quantization``) to compute as in training. The run's ``model.device`` is
not reused: the merge runs where ``auto`` points (the GPU when one is visible).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peft import PeftModel

from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.models.adapters import PROMPT_METHODS
from fedlm.models.loading import load_base_model

if TYPE_CHECKING:
    from fedlm.config.schema import ExperimentConfig

_DEQUANTIZED_NOTE = """# Merged model (fedlm `export --merge`)

The run trained its adapter on a {mode} quantized base (`model.quantization: {mode}`). A quantized weight cannot
hold W + s B A, so the adapter was merged into the de-quantized, full-precision float32 base: this model differs from
the trained one by the base's quantization error. Load it with `model.quantization: {mode}` to compute as in training.
"""


def finished_run_config(run_dir: Path) -> Path:
    """The saved ``config.yaml`` of the finished run in ``run_dir``; refuses a folder without one or its adapter."""
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "adapter").is_dir():
        raise FedlmError(f"{run_dir} holds no finished fedlm run (config.yaml and adapter/ are needed)")
    return run_dir / "config.yaml"


def export_merged(run_dir: Path, out_dir: Path, config: ExperimentConfig) -> Path:
    """Merge ``run_dir/adapter`` into the base model of the run's ``config`` (its saved ``config.yaml``), in float32,
    and save it, float32, with the tokenizer to ``out_dir``."""
    finished_run_config(run_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FedlmError(f"{out_dir} already exists and is not empty; choose a new folder")
    method = config.peft.method
    if method == "full":
        raise FedlmError(f"a `peft.method: full` run's adapter/ is already a full model: use `model.name: {run_dir / 'adapter'}`")
    if method in PROMPT_METHODS:
        raise FedlmError(f"`peft.method: {method}` learns soft tokens, not weights: there is nothing to merge")
    # the merge in float32 and full precision, whatever dtype and quantization the run trained with
    base = config.model.model_copy(update={"dtype": "float32", "quantization": "none", "gradient_checkpointing": False, "device": "auto"})
    loaded = load_base_model(base, seed=derive_seed(config.seed, "base-init") % 2**31)  # as build_session does
    merged = PeftModel.from_pretrained(loaded.model, str(run_dir / "adapter")).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    loaded.tokenizer.save_pretrained(str(out_dir))
    if config.model.quantization != "none":
        (out_dir / "README.md").write_text(_DEQUANTIZED_NOTE.format(mode=config.model.quantization))
    return out_dir
