"""The personalization section of a report: per client, the global model, the personal model and each mix on the
client's own test share and on the other clients' shares (from the ``personal`` records of ``metrics.jsonl``,
:mod:`fedlm.personalization.evaluation`), the goal's tally, and a plot (``plots/personalization.png``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlm.reporting.plots import _pyplot
from fedlm.reporting.report import markdown_table

PERSONAL_SPLIT = "personal"
#: the goal of the personalization evaluation: lose at most this share of the global loss on the others' shares
MAX_OTHERS_INCREASE = 0.05


def best_per_client(records: Sequence[Mapping[str, Any]], max_others_increase: float = MAX_OTHERS_INCREASE) -> list[dict[str, Any]]:
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


def personal_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One table row per (client, model) of the last personal evaluation, with changes against the global model."""
    personal = [r for r in records if r.get("split") == PERSONAL_SPLIT]
    if not personal:
        return []
    last = max(int(r["round"]) for r in personal)
    personal = [r for r in personal if int(r["round"]) == last]
    glob = {r["client"]: r for r in personal if r["model"] == "global"}
    rows = []
    for r in sorted(personal, key=lambda r: (str(r["client"]), r["model"] != "global", str(r["model"]))):
        g = glob.get(r["client"], {})
        row = {"client": r["client"], "model": r["model"], "own loss": r.get("own_loss"), "others loss": r.get("others_loss")}
        if r["model"] != "global" and g.get("own_loss") and r.get("own_loss") is not None:
            row["own vs global"] = f"{100 * (r['own_loss'] / g['own_loss'] - 1):+.1f}%"
        if r["model"] != "global" and g.get("others_loss") and r.get("others_loss") is not None:
            row["others vs global"] = f"{100 * (r['others_loss'] / g['others_loss'] - 1):+.1f}%"
        rows.append(row)
    return rows


def personal_section(records: Sequence[Mapping[str, Any]], run_dir: Path) -> tuple[str, str] | None:
    """``(heading, markdown)`` of the personalization section, or None without personal records."""
    rows = personal_rows(records)
    if not rows:
        return None
    best = best_per_client(records)
    wins = sum(1 for b in best if b["wins"])
    columns = ["client", "model", "own loss", "others loss", "own vs global", "others vs global"]
    body = [
        "Each client's models on its own test share (personalization) and on the other clients' shares (generalization); token-mean loss.",
        markdown_table(rows, columns),
        f"The best personal or mixed model beats the global one on the client's own share, losing at most "
        f"{100 * MAX_OTHERS_INCREASE:.0f}% of the global loss on the others' shares, for **{wins} of {len(best)} clients** "
        "(clients with a test share).",
        markdown_table(best, ["client", "best", "global_own", "best_own", "global_others", "best_others", "others_change", "wins"]),
    ]
    plot = plot_personal(records, run_dir / "plots")
    if plot is not None:
        body.append(f"![personalization]({plot.relative_to(run_dir).as_posix()})")
    return "Personalization", "\n\n".join(body)


def plot_personal(records: Sequence[Mapping[str, Any]], out_dir: Path) -> Path | None:
    """``personalization.png``: per client, each model's loss on the own share (left) and the others' (right)."""
    rows = personal_rows(records)
    if not rows:
        return None
    clients = sorted({str(r["client"]) for r in rows})
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    value = {(str(r["client"]), str(r["model"])): r for r in rows}
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.2 * len(clients) * 2), 4.0), sharey=True)
    width = 0.8 / len(models)
    for ax, key, title in ((axes[0], "own loss", "own test share"), (axes[1], "others loss", "other clients' shares")):
        for j, model in enumerate(models):
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(clients))]
            ys = [value.get((c, model), {}).get(key) or 0.0 for c in clients]
            ax.bar(xs, ys, width=width, label=model)
        ax.set_xticks(range(len(clients)))
        ax.set_xticklabels(clients, rotation=45, ha="right", fontsize="small")
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[1].legend(fontsize="small")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "personalization.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
