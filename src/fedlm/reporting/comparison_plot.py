"""``plots/comparison.png`` of ``fedlm compare``: base, local-only, centralized and federated side by side, one panel
per metric of the global test set (bars; local-only is the mean over clients, its spread shown as a range)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlm.reporting.plots import BOUNDED_METRICS, finite


def plot_comparison(
    global_rows: Sequence[Mapping[str, Any]], local_rows: Mapping[str, Mapping[str, Any]], metrics: Sequence[str], path: Path
) -> Path | None:
    """One bar per method and panel per metric (those with values); None when there is nothing to draw."""
    import matplotlib  # noqa: PLC0415 - ~30 MiB and ~1 s; only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after the backend is chosen

    shown = [m for m in metrics if any(finite(row.get(m)) is not None for row in global_rows)]
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.8), squeeze=False)
    colours = {"base": "#9e9e9e", "local-only (mean)": "#ff9800", "centralized": "#2196f3", "federated": "#4caf50"}
    for ax, metric in zip(axes[0], shown):
        names = [str(row["method"]) for row in global_rows]
        values = [finite(row.get(metric)) or 0.0 for row in global_rows]
        bars = ax.bar(range(len(names)), values, color=[colours.get(n, "#607d8b") for n in names])
        local = [v for row in local_rows.values() if (v := finite(row.get(metric))) is not None]
        if local and "local-only (mean)" in names:
            i = names.index("local-only (mean)")
            ax.vlines(i, min(local), max(local), color="black", linewidth=1.2, label="clients' range")
            ax.legend(fontsize="x-small", loc="lower right")
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize="x-small")
        ax.set_xticks(range(len(names)), [n.replace(" (mean)", "\n(mean)") for n in names], fontsize="small")
        ax.set_title(metric)
        if metric in BOUNDED_METRICS:
            ax.set_ylim(0.0, min(1.0, max(0.05, max(values + local) * 1.25)))
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Global test set: base vs local-only vs centralized vs federated")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
