"""``peft.method: full``: every weight of the base model trains, and the "adapter" is the whole model.

Each client update then holds a delta for every parameter (4 bytes each on the wire), the simulation keeps one
float32 copy per round's update, and AdamW keeps two moments per parameter, so ``full`` is refused above a size
limit (:data:`FULL_MAX_PARAMS`). The final ``adapter/`` folder of a full run is a Hugging Face model folder
(``config.json`` + ``model.safetensors`` in float32 + the tokenizer): load it with ``AutoModelForCausalLM.from_pretrained``,
or start a later run from it with ``model.name: RUN_DIR/adapter`` (or ``model.init_adapter`` with ``full``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from fedlm.core.errors import FedlmError

#: The largest model ``full`` accepts, by where it trains. CPU: ~16 bytes per parameter of training state (weights,
#: gradients, two AdamW moments) plus a float32 delta per client of the round; 200M parameters is ~3.2 GB of state
#: and minutes per step on a few cores. GPU: ~1.5B parameters fits the training state in ~24 GB.
FULL_MAX_PARAMS = {"cpu": 200_000_000, "cuda": 1_500_000_000}

_NOTE = """# Full model (fedlm `peft.method: full`)

This folder is the whole fine-tuned model, not a peft adapter: every weight was trained.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("{path}")
    tokenizer = AutoTokenizer.from_pretrained("{path}")

Start a later fedlm run from it with `model.name: {path}` (any `peft.method`), or with
`peft.method: full` and `model.init_adapter: {path}`.
"""


def check_full_size(num_params: int, device_type: str) -> None:
    """Refuse ``peft.method: full`` for a model of ``num_params`` parameters above the limit for ``device_type``."""
    limit = FULL_MAX_PARAMS.get(device_type, FULL_MAX_PARAMS["cpu"])
    if num_params > limit:
        raise FedlmError(
            f"`peft.method: full` trains every weight, and this model has {num_params / 1e6:.0f}M parameters, above the "
            f"{limit / 1e6:.0f}M limit on {device_type} (training state ~16 bytes per parameter, plus a float32 delta per "
            "client each round); use a parameter-efficient method such as `peft.method: lora`, or a smaller model"
        )


def make_fully_trainable(model: PreTrainedModel) -> PreTrainedModel:
    """Make every parameter of ``model`` trainable (after checking its size) and return it."""
    first = next(model.parameters())
    check_full_size(sum(p.numel() for p in model.parameters()), first.device.type)
    model.requires_grad_(True)
    return model


def save_full_model(model: PreTrainedModel, out_dir: Path) -> None:
    """Save the whole model as a Hugging Face folder (safetensors), with a README saying what it is.

    The weights and ``config.json``'s dtype are float32 whatever the run computed in, as every adapter fedlm saves:
    a bfloat16 run's weights upcast exactly, so loading the folder in float32 gives the trained values bit for bit,
    and in bfloat16 (``model.dtype``) too. The parameters are upcast in place for the save and cast back after
    (lossless); buffers are left alone (a bfloat16 model keeps its rotary frequencies in float32, as loaded).
    """
    params = list(model.parameters())  # tied weights once
    dtypes = [p.dtype for p in params]
    config_dtype = model.config.dtype
    try:
        for p in params:
            p.data = p.data.to(torch.float32)
        model.config.dtype = torch.float32
        model.save_pretrained(str(out_dir))
    finally:
        for p, dtype in zip(params, dtypes):
            p.data = p.data.to(dtype)
        model.config.dtype = config_dtype
    (out_dir / "README.md").write_text(_NOTE.format(path=out_dir))
