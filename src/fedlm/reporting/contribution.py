"""The contribution section of a report and the ``fedlm contribution`` table: each client's cumulative score by every
method, its rank, how many rounds it was scored in, the rank agreement of the methods and their cost (from the
``contribution`` field of the ``aggregate`` records of ``metrics.jsonl``), and ``plots/contribution.png``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlm.reporting.plots import _pyplot
from fedlm.reporting.tables import markdown_table

FIELD = "contribution"


def scored_rounds(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ``aggregate`` records that carry contribution scores, in round order (the last one of each round)."""
    by_round = {int(r["round"]): r for r in records if r.get("split") == "aggregate" and r.get(FIELD)}
    return [by_round[k] for k in sorted(by_round)]


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values`` (ties share their mean rank)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation of two paired score lists (None when either is constant or too short)."""
    if len(a) != len(b) or len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va > 0 and vb > 0 else None


def contribution_rows(records: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per client (best first by the primary method): cumulative score and rank per method, rounds scored;
    and the method names, primary first."""
    rounds = scored_rounds(records)
    if not rounds:
        return [], []
    last = rounds[-1][FIELD]
    methods = [last["primary"], *(m for m in last["methods"] if m != last["primary"])]
    clients = list(last["methods"][methods[0]]["cumulative"])
    joined = {c: sum(1 for r in rounds if c in r[FIELD]["methods"][methods[0]]["scores"]) for c in clients}
    rows: dict[str, dict[str, Any]] = {c: {"client": c, "rounds scored": joined[c]} for c in clients}
    for method in methods:
        totals = last["methods"][method]["cumulative"]
        ranks = average_ranks([-totals[c] for c in clients])
        for c, rank in zip(clients, ranks):
            rows[c][method] = totals[c]
            rows[c][f"{method} rank"] = rank
    ordered = sorted(rows.values(), key=lambda r: r[f"{methods[0]} rank"])
    return ordered, methods


def cost_rows(records: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per method: coalitions priced and server forward passes per scored round (mean), as if it ran alone."""
    rounds = scored_rounds(records)
    out = []
    for method in methods:
        entries = [r[FIELD]["methods"][method] for r in rounds if method in r[FIELD]["methods"]]
        n = max(len(entries), 1)
        out.append(
            {
                "method": method,
                "coalitions / round": sum(e["coalitions"] for e in entries) / n,
                "forward passes / round": sum(e["forward_passes"] for e in entries) / n,
            }
        )
    return out


def contribution_section(records: Sequence[Mapping[str, Any]], run_dir: Path) -> tuple[str, str] | None:
    """``(heading, markdown)`` of the contribution section, or None without scores."""
    rows, methods = contribution_rows(records)
    if not rows:
        return None
    examples = scored_rounds(records)[-1][FIELD]["validation_examples"]
    columns = ["client", *(c for m in methods for c in (m, f"{m} rank")), "rounds scored"]
    body = [
        f"Cumulative contribution per client: the sum over rounds of its score (the drop in validation loss it is credited "
        f"with, on {examples} server validation examples); {methods[0]} drives `federation.sampling: contribution`.",
        markdown_table(rows, columns),
        "Cost (a forward pass: one validation batch of one coalition's model):",
        markdown_table(cost_rows(records, methods), ["method", "coalitions / round", "forward passes / round"]),
    ]
    if len(methods) > 1:
        first = [r[methods[0]] for r in rows]
        agreement = [{"methods": f"{methods[0]} vs {m}", "spearman": spearman(first, [r[m] for r in rows])} for m in methods[1:]]
        body.append(markdown_table(agreement, ["methods", "spearman"]))
    plot = plot_contribution(records, run_dir / "plots")
    if plot is not None:
        body.append(f"![contribution]({plot.relative_to(run_dir).as_posix()})")
    return "Contribution", "\n\n".join(body)


def plot_contribution(records: Sequence[Mapping[str, Any]], out_dir: Path) -> Path | None:
    """``contribution.png``: each client's cumulative score (primary method) after each scored round."""
    rounds = scored_rounds(records)
    if not rounds:
        return None
    primary = rounds[-1][FIELD]["primary"]
    clients = list(rounds[-1][FIELD]["methods"][primary]["cumulative"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    xs = [int(r["round"]) for r in rounds]
    for client in clients:
        ax.plot(xs, [r[FIELD]["methods"][primary]["cumulative"].get(client, 0.0) for r in rounds], marker="o", label=client)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(xs)
    ax.set_xlabel("round")
    ax.set_ylabel(f"cumulative score ({primary})")
    ax.set_title("contribution per client")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "contribution.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
