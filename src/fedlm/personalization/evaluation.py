"""Personalization vs generalization: every client's personal model (and its mix with the global one) scored on
its own test share and on the other clients' shares, beside the global model on the same shares.

One ``metrics.jsonl`` record per (client, model), split ``personal``: ``own_<metric>`` on the client's own test
share, ``others_<metric>`` on the union of the other clients' shares (the objective's summary: token-mean loss and
perplexity), and ``share_loss`` per share. Each model is scored once on the whole test set; the shares group its
per-example scores (so this costs one pass per model, not one per share).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from fedlm.core.update import TensorDict
from fedlm.evaluation.evaluator import Evaluator
from fedlm.reporting.personalization import PERSONAL_SPLIT


def share_summary(evaluator: Evaluator, rows: Sequence[Mapping[str, Any]], client: str) -> dict[str, Any]:
    """``own_*`` and ``others_*`` metrics of ``client`` and the loss on every share from per-example ``rows``."""
    own = [r for r in rows if r.get("client") == client]
    others = [r for r in rows if r.get("client") not in (None, client)]
    out: dict[str, Any] = {"own_examples": len(own), "others_examples": len(others)}
    for prefix, group in (("own", own), ("others", others)):
        if group:
            out.update({f"{prefix}_{k}": v for k, v in evaluator.objective.summarize(group).items()})
    shares = sorted({str(r["client"]) for r in rows if r.get("client") is not None})
    out["share_loss"] = {s: evaluator.objective.summarize([r for r in rows if r.get("client") == s]).get("loss") for s in shares}
    return out


def score_rows(
    evaluator: Evaluator, state: TensorDict | None, round_num: int, context: AbstractContextManager[Any] | None = None
) -> list[dict[str, Any]]:
    """Per-example scores of ``state`` (None: the model as ``context`` sets it up) on the whole test set."""
    with context or nullcontext():
        return evaluator.evaluate(state, round_num).predictions


def personal_records(
    evaluator: Evaluator,
    round_num: int,
    global_state: TensorDict,
    clients: Sequence[str],
    models: Mapping[str, Callable[[str], list[dict[str, Any]]]],
) -> list[dict[str, Any]]:
    """Records of the global model and of each of ``models`` (name -> per-example rows of that client's model: its
    personal model, each mix) on the client's own share and on the others' shares."""
    global_rows = score_rows(evaluator, global_state, round_num)
    records: list[dict[str, Any]] = []
    for client in clients:
        scored = {"global": global_rows, **{name: rows_of(client) for name, rows_of in models.items()}}
        for model, rows in scored.items():
            records.append({"round": round_num, "split": PERSONAL_SPLIT, "client": client, "model": model, **share_summary(evaluator, rows, client)})
    return records
