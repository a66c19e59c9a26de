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

PERSONAL_SPLIT = "personal"


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
    personal: Mapping[str, TensorDict],
    mixes: Mapping[str, Callable[[str], list[dict[str, Any]]]] | None = None,
) -> list[dict[str, Any]]:
    """Records of the global model, each client's personal model and each mix (name -> per-example rows of
    that client's mixed model) on the client's own share and the others' shares."""
    global_rows = score_rows(evaluator, global_state, round_num)
    records: list[dict[str, Any]] = []
    for client, state in personal.items():
        models: dict[str, list[dict[str, Any]]] = {"global": global_rows, "personal": score_rows(evaluator, state, round_num)}
        for name, rows_of in (mixes or {}).items():
            models[name] = rows_of(client)
        for model, rows in models.items():
            records.append({"round": round_num, "split": PERSONAL_SPLIT, "client": client, "model": model, **share_summary(evaluator, rows, client)})
    return records


def best_per_client(records: Sequence[Mapping[str, Any]], max_others_increase: float = 0.05) -> list[dict[str, Any]]:
    """Per client: the global losses and the non-global model with the lowest own loss among those within
    ``max_others_increase`` of the global loss on the others' shares (else the lowest own loss), and whether it
    beats the global model on the own share while keeping the others' loss within bound."""
    by_client: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in records:
        if r.get("split") == PERSONAL_SPLIT and r.get("own_loss") is not None:
            by_client.setdefault(str(r["client"]), {})[str(r["model"])] = r
    out: list[dict[str, Any]] = []
    for client in sorted(by_client):
        models = by_client[client]
        glob = models.get("global")
        if glob is None:
            continue
        bound = (glob.get("others_loss") or float("inf")) * (1.0 + max_others_increase)
        candidates = [(m, r) for m, r in models.items() if m != "global"]
        if not candidates:
            continue
        within = [(m, r) for m, r in candidates if (r.get("others_loss") or 0.0) <= bound]
        name, best = min(within or candidates, key=lambda mr: mr[1]["own_loss"])
        others_change = (best.get("others_loss", 0.0) / glob["others_loss"] - 1.0) if glob.get("others_loss") else None
        out.append(
            {
                "client": client,
                "global_own": glob["own_loss"],
                "best": name,
                "best_own": best["own_loss"],
                "global_others": glob.get("others_loss"),
                "best_others": best.get("others_loss"),
                "others_change": others_change,
                "wins": best["own_loss"] < glob["own_loss"] and (others_change is None or others_change <= max_others_increase),
            }
        )
    return out
