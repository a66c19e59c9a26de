"""The continual section of ``report.md``: per metric the accuracy matrix (stage x slice), the forgetting summary
after each stage, and a heat map per metric (``plots/continual_<metric>.png``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlm.continual.observer import SUMMARY_SPLIT, matrices
from fedlm.reporting.plots import _pyplot
from fedlm.reporting.tables import markdown_table

_SUMMARY = ("average", "forgetting", "bwt", "fwt")


def _slices(matrix: Mapping[int, Mapping[str, float]]) -> list[str]:
    return list(dict.fromkeys(s for k in sorted(matrix) for s in matrix[k]))


def matrix_table(matrix: Mapping[int, Mapping[str, float]]) -> str:
    """A markdown table: one row per stage (0: before training), one column per slice."""
    slices = _slices(matrix)
    rows = [{"stage": k, **{s: matrix[k].get(s) for s in slices}} for k in sorted(matrix)]
    return markdown_table(rows, ["stage", *slices])


def plot_matrix(metric: str, matrix: Mapping[int, Mapping[str, float]], out_dir: Path) -> Path:
    """``continual_<metric>.png``: the matrix as a heat map, each cell annotated."""
    slices = _slices(matrix)
    stages = sorted(matrix)
    values = [[matrix[k].get(s, float("nan")) for s in slices] for k in stages]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(slices), 1.0 + 0.6 * len(stages)))
    image = ax.pcolormesh(values, cmap="viridis_r" if metric == "loss" else "viridis")  # vector cells: no image resampling
    ax.invert_yaxis()
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                r, g, b, _ = image.cmap(image.norm(v))
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"  # readable on light and dark cells
                ax.text(j + 0.5, i + 0.5, f"{v:.3g}", ha="center", va="center", color=ink, fontsize="small")
    ax.set_xticks([j + 0.5 for j in range(len(slices))])
    ax.set_xticklabels(slices, rotation=45, ha="right", fontsize="small")
    ax.set_yticks([i + 0.5 for i in range(len(stages))])
    ax.set_yticklabels([str(k) for k in stages])
    ax.set_xlabel("test slice")
    ax.set_ylabel("after stage")
    ax.set_title(f"{metric} per slice after each stage")
    fig.colorbar(image, ax=ax)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"continual_{metric}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def continual_section(records: Sequence[Mapping[str, Any]], run_dir: Path) -> tuple[str, str] | None:
    """``(heading, body)`` of the continual section, or None when the run logged no stage evaluation."""
    found = matrices(records)
    if not found:
        return None
    parts = [
        "Rows: the global model after each stage (0: before training); columns: each slice's test records. "
        "Forgetting (Chaudhry et al. 2018) and backward/forward transfer (Lopez-Paz & Ranzato 2017) are computed on "
        "scores where higher is better, so for the loss on -loss: positive forgetting and negative BWT mean forgetting."
    ]
    for metric, matrix in found.items():
        summary = [
            {"stage": r["stage"], **{k: r.get(k) for k in _SUMMARY}} for r in records if r.get("split") == SUMMARY_SPLIT and r.get("metric") == metric
        ]
        path = plot_matrix(metric, matrix, run_dir / "plots")
        parts += [f"### {metric}", matrix_table(matrix)]
        if summary:
            parts.append(markdown_table(summary, ["stage", *_SUMMARY]))
        parts.append(f"![continual {metric}]({path.relative_to(run_dir).as_posix()})")
    return "Continual learning: accuracy matrix and forgetting", "\n\n".join(parts)
