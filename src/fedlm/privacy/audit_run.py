"""``fedlm audit RUN_DIR``: membership inference against a run's final global model.

Members are training examples (of one client, or of every client), non-members the held-out test examples, both
seeded samples of equal size. For each example the global model's token log-probabilities on the response tokens
give three scores (loss, zlib ratio, Min-K% prob; :mod:`fedlm.privacy.audit`), and each score's AUC and TPR at
1% / 0.1% FPR are written to ``RUN_DIR/audit.json`` next to the epsilon the run spent (if it was private).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from fedlm.config_io import load_config
from fedlm.data.collate import collate_for_loss
from fedlm.data.tokenize import IGNORE_INDEX, TokenizedExample
from fedlm.errors import FedlmError
from fedlm.experiment import build_session
from fedlm.federation.checkpoint import list_checkpoints, load_checkpoint
from fedlm.models.adapters import load_trainable_state
from fedlm.privacy.audit import loss_score, mia_report, min_k_score, zlib_score
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import RunDir
from fedlm.seeding import derive_seed

SCORES = ("loss", "zlib", "min_k")


def token_logprobs(model: torch.nn.Module, examples: Sequence[TokenizedExample], pad_id: int, device: torch.device, batch_size: int = 16) -> list[torch.Tensor]:
    """log p(token) of every response token of each example (1-D float tensors)."""
    out: list[torch.Tensor] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate_for_loss(examples[start : start + batch_size], pad_id).items()}
            labels = batch.pop("labels")[:, 1:]  # (B, T-1)
            logits = model(**batch).logits[:, :-1].float()  # (B, T-1, V)
            logp = F.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            out.extend(row[mask].cpu() for row, mask in zip(logp, labels != IGNORE_INDEX))
    return out


def example_scores(logprobs: torch.Tensor, text: str) -> dict[str, float]:
    """The three membership scores of one example (higher: more likely a member)."""
    nll = -logprobs.double()
    return {"loss": loss_score(nll), "zlib": zlib_score(float(nll.sum()), text), "min_k": min_k_score(logprobs.double())}


def response_text(example: TokenizedExample, tokenizer: PreTrainedTokenizerBase) -> str:
    """The decoded response tokens of an example."""
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX], skip_special_tokens=True)


def audit_run(run_dir: Path, client: str | None, max_examples: int, console: RunConsole) -> dict[str, Any]:
    """Score the run's last checkpoint; write and return ``audit.json``'s content."""
    folder = RunDir(Path(run_dir))
    checkpoints = list_checkpoints(folder.checkpoints)
    if not folder.config.is_file() or not checkpoints:
        raise FedlmError(f"{run_dir} holds no finished fedlm run (config.yaml and checkpoints/ are needed)")
    config = load_config(folder.config)
    session = build_session(config, console)
    ckpt = load_checkpoint(checkpoints[-1])
    load_trainable_state(session.model, ckpt.global_state)
    names = session.data.client_names
    if client is not None and client not in names:
        raise FedlmError(f"--client {client!r} is not a client of this run; the clients are {names}")
    pool = session.data.client_train[client] if client else session.data.union_train()
    rng = random.Random(derive_seed(config.seed, "audit"))
    count = min(max_examples, len(pool), len(session.data.test))
    members = rng.sample(list(pool), count)
    nonmembers = [ex.tokens for ex in rng.sample(list(session.data.test), count)]
    tok, device = session.loaded.tokenizer, session.loaded.device
    per_set = {}
    for label, examples in (("members", members), ("nonmembers", nonmembers)):
        logprobs = token_logprobs(session.model, examples, tok.pad_token_id, device)
        per_set[label] = [example_scores(lp, response_text(ex, tok)) for lp, ex in zip(logprobs, examples)]
    report: dict[str, Any] = {"round": ckpt.round, "client": client, "examples_per_set": count}
    for score in SCORES:
        report[score] = mia_report([s[score] for s in per_set["members"]], [s[score] for s in per_set["nonmembers"]])
    spent = [r["aggregation"]["epsilon"] for r in MetricsLog(folder.metrics).read() if r.get("split") == "aggregate" and "epsilon" in r.get("aggregation", {})]
    report["epsilon"] = spent[-1] if spent else None
    report["delta"] = config.privacy.delta if spent else None
    (folder.root / "audit.json").write_text(json.dumps(report, indent=1))
    return report
