"""Opening a finished run for inference: the base model once, the global and every client's adapter on it.

A run folder (``fedlm run``) holds ``config.yaml``, the global adapter ``adapter/`` (a peft folder, or for
``peft.method: full`` a whole model folder) and, when personalization ran, per client ``clients/<name>/adapter/``
(the client's personal adapter), ``clients/<name>/personal.json`` (``{"method": ..., "combine": "replace" | "dual"}``,
and for dual the global adapter's ``weight`` in the personal model; for prompt, ``clients/<name>/prompt/`` holds the
client's soft prompt, a peft prompt-tuning folder, put before the inputs of its adapter)
and ``clients/<name>/profile.safetensors`` (key ``centroid``: the client's mean pooled base hidden state, for
``weight: auto``). Every adapter is a named peft adapter on the one base model: ``global`` and one per client (served as ``client/<name>``);
K clients cost one base model plus K small adapters (the architecture's rule).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedlm.config.io import load_config
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.models.adapters import PROMPT_METHODS
from fedlm.models.loading import load_base_model

GLOBAL = "global"
Combine = Literal["replace", "dual", "prompt"]


@dataclass(frozen=True)
class ClientModel:
    """One client's personal side: its peft adapter name, how it combines with the global adapter, its centroid."""

    name: str
    adapter: str  # the peft adapter name (``client-<i>``: client names may hold dots, which module names may not)
    combine: Combine  # replace: the adapter is the whole personal model; dual (FedDPA): combined with the global one
    method: str  # the personalization method that trained it (personal.json), for messages
    centroid: torch.Tensor | None  # (hidden,) float32, None without profile.safetensors
    dual_weight: float = 0.5  # dual: the local adapter's weight in the personal model (1 - personal.json `weight`)
    soft_prompt: torch.Tensor | None = None  # prompt: (n, H) embeddings before every input (clients/<name>/prompt/)


@dataclass
class InferenceRun:
    """A run opened for inference: one base model (a ``PeftModel`` with every adapter, or a full model)."""

    root: Path
    config: ExperimentConfig
    model: PeftModel | PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    clients: dict[str, ClientModel] = field(default_factory=dict)

    @property
    def has_adapters(self) -> bool:
        """False for a ``peft.method: full`` run (the global model is the whole model, no adapter to swap)."""
        return isinstance(self.model, PeftModel)

    @property
    def is_lora(self) -> bool:
        """The run's adapters are plain LoRA (what the ``adapter`` mix can weight inside one forward pass)."""
        return self.config.peft.method == "lora"

    def client(self, name: str) -> ClientModel:
        """The client ``name``; an unknown name is refused with the valid ones."""
        if name not in self.clients:
            known = ", ".join(sorted(self.clients)) or "none: this run saved no personal adapters"
            raise FedlmError(f"unknown client {name!r}; clients with a personal model: {known}")
        return self.clients[name]


def open_run(run_dir: str | Path, device: torch.device | None = None) -> InferenceRun:
    """Load ``run_dir``'s base model (as the run did: same config and seed), its global adapter as ``global`` and every
    client's personal adapter, in eval mode."""
    root = Path(run_dir)
    if not (root / "config.yaml").is_file() or not (root / "adapter").is_dir():
        raise FedlmError(f"{root} holds no finished fedlm run (config.yaml and adapter/ are needed); pass the folder `fedlm run` wrote")
    config = load_config(root / "config.yaml")
    method = config.peft.method
    if method in PROMPT_METHODS:
        raise FedlmError(
            f"`peft.method: {method}` runs cannot be served yet: the cached token loop of fedlm.inference handles weight "
            "adapters (lora, dora, ia3) and full models; evaluate soft-prompt runs with `fedlm run`'s evaluation instead"
        )
    seed = derive_seed(config.seed, "base-init") % 2**31  # the run's base model (the tiny model is built from it)
    if method == "full":
        full = config.model.model_copy(update={"name": str(root / "adapter"), "gradient_checkpointing": False})
        loaded = load_base_model(full, seed=seed, device=device)
        model: PeftModel | PreTrainedModel = loaded.model
    else:
        loaded = load_base_model(config.model.model_copy(update={"gradient_checkpointing": False}), seed=seed, device=device)
        model = PeftModel.from_pretrained(loaded.model, str(root / "adapter"), adapter_name=GLOBAL)
    model.eval()
    run = InferenceRun(root, config, model, loaded.tokenizer, loaded.device)
    for folder in sorted((root / "clients").glob("*/adapter")):
        client = _load_client(run, folder.parent)
        run.clients[client.name] = client
    if isinstance(model, PeftModel):
        model.set_adapter(GLOBAL)
    model.eval()  # adapters loaded after the first eval() come in training mode (their dropout on)
    return run


def _load_client(run: InferenceRun, folder: Path) -> ClientModel:
    """Load ``folder/adapter`` onto the run's model, with its ``personal.json``, centroid and soft prompt."""
    name = folder.name
    if not isinstance(run.model, PeftModel):
        raise FedlmError(f"client {name!r} has a personal adapter but the run's `peft.method: full` model takes no adapters")
    info = json.loads((folder / "personal.json").read_text()) if (folder / "personal.json").is_file() else {}
    combine = info.get("combine", "replace")
    if combine not in ("replace", "dual", "prompt"):
        raise FedlmError(f"{folder / 'personal.json'}: `combine` must be replace, dual or prompt, got {combine!r}")
    soft_prompt = None
    if combine == "prompt":
        path = folder / "prompt" / "adapter_model.safetensors"
        if not path.is_file():
            raise FedlmError(f"client {name!r}: personal.json says `combine: prompt` but {path} is missing")
        soft_prompt = load_file(str(path))["prompt_embeddings"].float().to(run.device)  # (n, H)
    if combine == "dual" and run.config.peft.method != "lora":
        raise FedlmError(
            f"client {name!r}: a dual (FedDPA) local adapter is combined with the global one as LoRA; this run's `peft.method` is {run.config.peft.method!r}"
        )
    global_weight = float(info.get("weight", 0.5))
    if not 0.0 <= global_weight <= 1.0:
        raise FedlmError(f"{folder / 'personal.json'}: `weight` (the global adapter's, dual) must lie in [0, 1], got {global_weight}")
    adapter = f"client-{len(run.clients)}"  # peft's adapter name: a module key, which may not hold the "." of names like noun.animal
    run.model.load_adapter(str(folder / "adapter"), adapter_name=adapter)
    centroid = None
    if (folder / "profile.safetensors").is_file():
        centroid = load_file(str(folder / "profile.safetensors"))["centroid"].float().to(run.device)
    return ClientModel(name, adapter, combine, str(info.get("method", "unknown")), centroid, 1.0 - global_weight, soft_prompt)
