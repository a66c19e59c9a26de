"""The privacy audit of a finished run (``fedlm audit RUN_DIR``, :mod:`fedlm.cli.audit`, and the end of ``fedlm run``
with ``eval.audit``).

Membership inference against the final global model: members are training examples (of one client, or of every
client; planted canaries left out), non-members the held-out test examples, both seeded samples of equal size. For
each example the model's token log-probabilities on the response tokens give three scores (loss, zlib ratio, Min-K%
prob; :mod:`fedlm.privacy.audit`), and each score's AUC and TPR at 1% / 0.1% FPR are written to
``RUN_DIR/audit.json`` next to the epsilon the run spent (if it was private).

With canaries (``eval.audit.canaries``; Carlini et al. 2019, :mod:`fedlm.privacy.canary_audit`) their exposure in
bits is reported under ``canaries``. When the run saved a client's local model (``eval.audit.client_model``,
:mod:`fedlm.privacy.client_models`), the same attacks, with that client's training examples as members, and the
canary exposure run against it too, under ``client_model``: client-level DP protects the released global model,
not the client's own.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.core.update import TensorDict
from fedlm.data.collate import collate_for_loss
from fedlm.data.tokenize import IGNORE_INDEX, TokenizedExample
from fedlm.models.adapters import load_trainable_state
from fedlm.privacy.audit import loss_score, mia_report, min_k_score, zlib_score
from fedlm.privacy.canary_audit import CanarySet, audit_client, canary_examples, canary_set, exposure_report
from fedlm.privacy.client_models import client_model_path, load_client_model
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import RunDir

if TYPE_CHECKING:
    from fedlm.experiment import Session

SCORES = ("loss", "zlib", "min_k")


def token_logprobs(
    model: torch.nn.Module, examples: Sequence[TokenizedExample], pad_id: int, device: torch.device, batch_size: int = 16
) -> list[torch.Tensor]:
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
    return {"loss": loss_score(nll.numpy()), "zlib": zlib_score(float(nll.sum()), text), "min_k": min_k_score(logprobs.double().numpy())}


def response_text(example: TokenizedExample, tokenizer: PreTrainedTokenizerBase) -> str:
    """The decoded response tokens of an example."""
    return str(tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX], skip_special_tokens=True))


def canary_exposure(session: Session, canaries: CanarySet) -> dict[str, Any]:
    """Exposure of the planted and control canaries under the session model's current adapter: each secret's
    log-likelihood (summed over its response tokens; the prompt is the same for all) ranked among the references'."""
    tok, device = session.loaded.tokenizer, session.loaded.device

    def log_likelihoods(secrets: list[str]) -> list[float]:
        examples = canary_examples(secrets, tok, session.config)
        return [float(lp.double().sum()) for lp in token_logprobs(session.model, examples, tok.pad_token_id, device, batch_size=64)]

    return exposure_report(canaries, log_likelihoods(canaries.planted), log_likelihoods(canaries.controls), log_likelihoods(canaries.references))


def audit_model(
    session: Session, state: TensorDict, members: Sequence[TokenizedExample], nonmembers: Sequence[TokenizedExample], canaries: CanarySet | None
) -> dict[str, Any]:
    """Each score's membership report (and the canary exposure) for the session model with adapter ``state``."""
    load_trainable_state(session.model, state)
    tok, device = session.loaded.tokenizer, session.loaded.device
    per_set = {}
    for label, examples in (("members", members), ("nonmembers", nonmembers)):
        logprobs = token_logprobs(session.model, examples, tok.pad_token_id, device)
        per_set[label] = [example_scores(lp, response_text(ex, tok)) for lp, ex in zip(logprobs, examples)]
    report: dict[str, Any] = {
        score: mia_report([s[score] for s in per_set["members"]], [s[score] for s in per_set["nonmembers"]]) for score in SCORES
    }
    if canaries is not None:
        report["canaries"] = canary_exposure(session, canaries)
    return report


def audit_session(
    session: Session, run_dir: RunDir, state: TensorDict, round_num: int, client: str | None, max_examples: int, console: RunConsole
) -> dict[str, Any]:
    """Audit the global adapter ``state`` after ``round_num`` (and a saved client model); write and return
    ``audit.json``'s content. ``client`` picks the members (default: every client's examples) and the client model."""
    config, names = session.config, session.data.client_names
    if client is not None and client not in names:
        raise FedlmError(f"--client {client!r} is not a client of this run; the clients are {names}")
    canaries = canary_set(config, names)
    planted = {tuple(ex.input_ids) for ex in canary_examples(canaries.planted, session.loaded.tokenizer, config)} if canaries else set()

    def pool(name: str | None) -> list[TokenizedExample]:
        examples = session.data.client_train[name] if name else session.data.union_train()
        return [ex for ex in examples if tuple(ex.input_ids) not in planted]

    rng = random.Random(derive_seed(config.seed, "audit"))
    test = [ex.tokens for ex in session.data.test if ex.in_global and ex.tokens.num_target_tokens > 0]  # a cut-off answer has nothing to score
    members = pool(client)
    count = min(max_examples, len(members), len(test))
    report: dict[str, Any] = {"round": round_num, "client": client, "examples_per_set": count}
    report.update(audit_model(session, state, rng.sample(members, count), rng.sample(test, count), canaries))
    target = client or (audit_client(config.eval.audit, names) if config.eval.audit else names[0])
    path = client_model_path(run_dir.root, target)
    if path.is_file():
        local, local_round = load_client_model(path)
        own = pool(target)
        n = min(max_examples, len(own), len(test))
        scores = audit_model(session, local, rng.sample(own, n), rng.sample(test, n), canaries)
        report["client_model"] = {"client": target, "round": local_round, "examples_per_set": n, **scores}
        load_trainable_state(session.model, state)  # leave the session holding the global adapter
    spent = [
        r["aggregation"]["epsilon"]
        for r in MetricsLog(run_dir.metrics).read()
        if r.get("split") == "aggregate" and "epsilon" in r.get("aggregation", {})
    ]
    report["epsilon"] = spent[-1] if spent else None
    report["delta"] = config.privacy.delta if spent else None
    (run_dir.root / "audit.json").write_text(json.dumps(report, indent=1))
    print_audit(report, console)
    return report


def print_audit(report: dict[str, Any], console: RunConsole) -> None:
    """One line per model and score (AUC, TPR at 1% / 0.1% FPR) and the canaries' exposure."""
    for name, part in (("global", report), ("client " + str(report.get("client_model", {}).get("client")), report.get("client_model"))):
        if not part:
            continue
        for score in SCORES:
            r = part[score]
            console.print(f"{name} {score}: AUC {r['auc']:.3f}, TPR@1%FPR {r['tpr_at_fpr_0.01']:.3f}, TPR@0.1%FPR {r['tpr_at_fpr_0.001']:.3f}")
        if "canaries" in part:
            c = part["canaries"]
            console.print(
                f"{name} canaries: exposure mean {c['mean_exposure_bits']:.2f} bits, max {c['max_exposure_bits']:.2f} "
                f"(controls {c['control']['mean_exposure_bits']:.2f}; at most {c['max_possible_bits']:.2f})"
            )
    if report.get("epsilon") is not None:
        console.print(f"epsilon {report['epsilon']:.3g} at delta {report['delta']:g}")
