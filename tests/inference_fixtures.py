"""Test fixtures for inference: a finished tiny run, and personal client adapters made by perturbing its global one
(a valid peft folder whatever the personalization method that would have trained it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from conftest import tiny_config, write_config
from safetensors.torch import load_file, save_file

DUAL_GLOBAL_WEIGHT = 0.7  # a dual client's personal model: 0.7 global + 0.3 local adapter
CLIENT_TEXTS = {
    "alice": ["The cat sat on the mat.", "A dog runs in the park."],
    "bob": ["1 2 3 4 5 6 7 8 9", "x = y + z * 2"],
}


def tiny_run(root: Path, runner: Any, **sections: dict[str, Any]) -> Path:
    """A 1-round tiny `fedlm run` (no evaluation) in ``root / 'run'``; returns the run folder."""
    from fedlm.cli.main import app

    defaults: dict[str, dict[str, Any]] = {
        "federation": {"rounds": 1, "clients_per_round": 3, "local_steps": 1, "batch_size": 4, "lr": 0.003},
        "eval": {"every": 0, "at_start": False, "generate": False, "max_examples": 4},
    }
    for name, values in sections.items():
        defaults[name] = {**defaults.get(name, {}), **values}
    root.mkdir(parents=True, exist_ok=True)
    config = tiny_config(root / "run", **defaults)
    result = runner.invoke(app, ["run", str(write_config(root / "config.yaml", config))])
    assert result.exit_code == 0, result.output
    return root / "run"


def perturb_adapter(src: Path, dst: Path, seed: int, scale: float = 0.3) -> None:
    """Copy the peft folder ``src`` to ``dst`` with seeded noise added to every tensor (LoRA B no longer zero)."""
    if src != dst:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    weights = load_file(str(dst / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    noisy = {k: (v + scale * torch.randn(v.shape, generator=gen)).contiguous() for k, v in weights.items()}
    save_file(noisy, str(dst / "adapter_model.safetensors"))


def add_clients(run_dir: Path, combine: str = "replace", profiles: bool = True, scale: float = 0.3) -> None:
    """Give ``run_dir`` a stronger global adapter and personal adapters for ``alice`` and ``bob`` (seeded noise of
    std ``scale``; personal.json with ``combine``; a centroid over each client's texts when ``profiles``)."""
    perturb_adapter(run_dir / "adapter", run_dir / "adapter", seed=100, scale=scale * 2 / 3)
    for i, name in enumerate(CLIENT_TEXTS):
        folder = run_dir / "clients" / name
        perturb_adapter(run_dir / "adapter", folder / "adapter", seed=i + 1, scale=scale)
        info = {"method": "test-perturbed", "combine": combine} | ({"weight": DUAL_GLOBAL_WEIGHT} if combine == "dual" else {})
        (folder / "personal.json").write_text(json.dumps(info))
    if profiles:
        write_profiles(run_dir)


def write_profiles(run_dir: Path) -> None:
    """Each client's centroid over its texts, by the personalization's own profile function."""
    from fedlm.inference.run import open_run
    from fedlm.personalization.profile import compute_profile, save_profile

    run = open_run(run_dir)
    for name, texts in CLIENT_TEXTS.items():
        ids = [run.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        save_profile(run_dir / "clients" / name / "profile.safetensors", compute_profile(run.model, run.tokenizer, ids, run.device))


def add_prompt_client(run_dir: Path, name: str = "carol", tokens: int = 4, seed: int = 7) -> None:
    """A ``combine: prompt`` client (the personalization's pFedPT-style method): the global adapter and a seeded
    soft prompt saved as a peft prompt-tuning folder in ``clients/<name>/prompt/``."""
    from peft import PromptTuningConfig

    from fedlm.inference.run import open_run

    config = open_run(run_dir).model.config
    folder = run_dir / "clients" / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(run_dir / "adapter", folder / "adapter")
    prompt_config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=tokens,
        token_dim=config.hidden_size,
        num_transformer_submodules=1,
        num_attention_heads=config.num_attention_heads,
        num_layers=config.num_hidden_layers,
    )
    (folder / "prompt").mkdir(parents=True)
    prompt_config.save_pretrained(str(folder / "prompt"))
    embeddings = torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(seed))
    save_file({"prompt_embeddings": embeddings.contiguous()}, str(folder / "prompt" / "adapter_model.safetensors"))
    (folder / "personal.json").write_text(json.dumps({"method": "prompt", "combine": "prompt"}))
