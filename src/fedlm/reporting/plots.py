"""Per-round metric plots of a federated run (PNG, matplotlib ``Agg``).

Records come from ``metrics.jsonl`` (see :mod:`fedlm.reporting.metrics_log`).
The series helpers here are also used by :mod:`fedlm.reporting.report`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn (it costs ~30 MiB and ~1 s)
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes
    from matplotlib.ticker import MaxNLocator

__all__ = [
    "GLOBAL_TEST",
    "TRAIN",
    "GENERATION_METRICS",
    "finite",
    "is_client_test",
    "client_name",
    "split_series",
    "client_test_series",
    "mean_train_loss",
    "plot_metrics",
]

GLOBAL_TEST = "global_test"
TRAIN = "train"
# Metrics that get their own figure when present on global_test.
GENERATION_METRICS: tuple[str, ...] = ("perplexity", "exact_match", "rouge_l", "mc_accuracy", "preference_accuracy", "reward_margin")
# Metrics that live in [0, 1]: their y-axis is drawn from 0 to 1 at most, never below 0.
BOUNDED_METRICS = frozenset({"exact_match", "rouge_l", "mc_accuracy", "preference_accuracy"})
HARNESS = "harness"
# Above this many curves the legend goes outside the axes.
_LEGEND_INSIDE_MAX = 6

Series = dict[int, float]


def finite(value: Any) -> float | None:
    """Return ``value`` as a float if it is a finite real number, else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _round_of(record: Mapping[str, Any]) -> int | None:
    """The record's integer round, or None if absent/invalid."""
    r = record.get("round")
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        return None
    return int(r)


def is_client_test(record: Mapping[str, Any]) -> bool:
    """Whether a record is a per-client test evaluation (``client_<c>_test``)."""
    split = record.get("split")
    return isinstance(split, str) and split.startswith("client_") and split.endswith("_test") and len(split) > len("client__test")


def client_name(record: Mapping[str, Any]) -> str:
    """Client of a record: its ``client`` field, else parsed from the split."""
    client = record.get("client")
    if client is not None:
        return str(client)
    split = str(record.get("split", ""))
    return split[len("client_") : -len("_test")] if is_client_test(record) else split


def split_series(records: Iterable[Mapping[str, Any]], split: str, metric: str) -> Series:
    """Per-round values of ``metric`` on ``split`` (the last record of a round wins).

    Args:
        records: Metrics records.
        split: Split name, e.g. ``"global_test"``.
        metric: Metric key, e.g. ``"loss"``.

    Returns:
        ``{round: value}`` sorted by round, finite values only.
    """
    out: Series = {}
    for rec in records:
        rnd, val = _round_of(rec), finite(rec.get(metric))
        if rec.get("split") == split and rnd is not None and val is not None:
            out[rnd] = val
    return dict(sorted(out.items()))


def client_test_series(records: Iterable[Mapping[str, Any]], metric: str) -> dict[str, Series]:
    """Per-client per-round values of ``metric`` on the client test splits.

    Returns:
        ``{client: {round: value}}``, clients sorted by name.
    """
    out: dict[str, Series] = {}
    for rec in records:
        rnd, val = _round_of(rec), finite(rec.get(metric))
        if is_client_test(rec) and rnd is not None and val is not None:
            out.setdefault(client_name(rec), {})[rnd] = val
    return {c: dict(sorted(s.items())) for c, s in sorted(out.items())}


def mean_train_loss(records: Iterable[Mapping[str, Any]]) -> dict[int, tuple[float, int]]:
    """Mean train loss over clients per round.

    Returns:
        ``{round: (mean_loss, num_clients)}`` sorted by round; for a client
        with several train records in one round the last one counts.
    """
    per_round: dict[int, dict[str, float]] = {}
    for rec in records:
        rnd, val = _round_of(rec), finite(rec.get("loss"))
        if rec.get("split") == TRAIN and rnd is not None and val is not None:
            per_round.setdefault(rnd, {})[str(rec.get("client"))] = val
    return {r: (sum(v.values()) / len(v), len(v)) for r, v in sorted(per_round.items())}


def _plot_series(ax: Axes, series: Series, label: str, **style: Any) -> None:
    """Draw one ``{round: value}`` series as a line with markers."""
    xs = list(series)
    ax.plot(xs, [series[x] for x in xs], label=label, **style)


def _pyplot() -> Any:
    """matplotlib's pyplot on the headless ``Agg`` backend, imported on first use."""
    import matplotlib  # noqa: PLC0415 - ~30 MiB and ~1 s; only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot  # noqa: PLC0415 - after the backend is chosen

    return pyplot


def _finish(fig: plt.Figure, ax: Axes, ylabel: str, title: str, path: Path) -> Path:
    """Label axes, place the legend, save the figure to ``path`` and close it."""
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    cast("MaxNLocator", ax.xaxis.get_major_locator()).set_params(integer=True)  # the default AutoLocator is one
    n_curves = len(ax.get_lines())
    if n_curves > _LEGEND_INSIDE_MAX:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    else:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def client_train_series(records: Iterable[Mapping[str, Any]]) -> dict[str, Series]:
    """Each client's train loss per round it trained in (``train`` records), clients sorted by name."""
    out: dict[str, Series] = {}
    for rec in records:
        rnd, val = _round_of(rec), finite(rec.get("loss"))
        if rec.get("split") == TRAIN and rnd is not None and val is not None:
            out.setdefault(str(rec.get("client")), {})[rnd] = val
    return {c: dict(sorted(s.items())) for c, s in sorted(out.items())}


def _plot_loss(records: list[dict], out_dir: Path) -> Path | None:
    """``loss.png``: the global test loss (bold), each client's test loss (thin, solid) and train loss (thin, dotted,
    same colour), and the mean client train loss (dashed)."""
    test = split_series(records, GLOBAL_TEST, "loss")
    train = {r: m for r, (m, _) in mean_train_loss(records).items()}
    if not test and not train:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    colours = _client_colours([*client_test_series(records, "loss"), *client_train_series(records)])
    for client, series in client_test_series(records, "loss").items():
        _plot_series(ax, series, f"{client} test", linewidth=1.0, alpha=0.85, marker=".", color=colours[client], zorder=3)
    for client, series in client_train_series(records).items():
        _plot_series(ax, series, f"{client} train", linewidth=0.8, alpha=0.6, linestyle=":", color=colours[client], zorder=3)
    if test:
        _plot_series(ax, test, "global_test loss", linewidth=4, marker="o", color="black", alpha=0.35, zorder=2)
    if train:
        _plot_series(ax, train, "mean client train loss", linewidth=2, linestyle="--", marker="s", color="grey", zorder=2)
    return _finish(fig, ax, "loss", "Loss per round", out_dir / "loss.png")


def _client_colours(clients: Iterable[str]) -> dict[str, Any]:
    """One colour per client, the same in every curve of a figure."""
    names = sorted(set(clients))
    cmap = _pyplot().get_cmap("tab20" if len(names) > 10 else "tab10")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _plot_metric(records: list[dict], metric: str, out_dir: Path) -> Path | None:
    """``<metric>.png``: per-client test curves (thin) and global_test (bold)."""
    glob = split_series(records, GLOBAL_TEST, metric)
    if not glob:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    # The global curve is wide, pale and underneath, so the client curves (often equal to it) stay visible on top.
    _plot_series(ax, glob, GLOBAL_TEST, linewidth=5, marker="o", color="black", alpha=0.3, zorder=2)
    for client, series in client_test_series(records, metric).items():
        _plot_series(ax, series, client, linewidth=1.1, alpha=0.9, marker=".", zorder=3)
    if metric in BOUNDED_METRICS:
        _bounded_axis(ax, [v for line in ax.get_lines() for v in line.get_ydata()])
    return _finish(fig, ax, metric, f"{metric} per round", out_dir / f"{metric}.png")


def _bounded_axis(ax: Axes, values: Iterable[Any]) -> None:
    """A y-axis for a metric in [0, 1]: from 0, to 1 or a little above the largest value, never below 0."""
    top = max((float(v) for v in values), default=1.0)
    ax.set_ylim(0.0, min(1.0, max(0.05, top * 1.15)) if top < 0.87 else 1.02)


def harness_series(records: Iterable[Mapping[str, Any]]) -> dict[str, Series]:
    """Each ``eval.harness`` task's headline metric per round (``split: harness`` records)."""
    out: dict[str, Series] = {}
    for rec in records:
        metric, rnd = rec.get("metric"), _round_of(rec)
        val = finite(rec.get(metric)) if isinstance(metric, str) else None
        if rec.get("split") == HARNESS and rnd is not None and val is not None:
            out.setdefault(f"{rec.get('task')} ({metric})", {})[rnd] = val
    return out


def _plot_harness(records: list[dict], out_dir: Path) -> Path | None:
    """``harness.png``: each benchmark task's accuracy per round (``eval.harness``)."""
    series = harness_series(records)
    if not series:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for label, values in series.items():
        _plot_series(ax, values, label, linewidth=1.8, marker="o")
    _bounded_axis(ax, [v for values in series.values() for v in values.values()])
    return _finish(fig, ax, "score", "Benchmarks per round (lm-evaluation-harness)", out_dir / "harness.png")


def plot_metrics(records: list[dict], out_dir: Path) -> list[Path]:
    """Write the per-round metric plots of a run as PNGs.

    Writes ``loss.png`` (global_test loss and mean client train loss, dashed)
    and one ``<metric>.png`` for each of ``perplexity``, ``exact_match``,
    ``rouge_l``, ``preference_accuracy`` and ``reward_margin`` (dpo) that has
    data on ``global_test`` (per-client test curves thin, global_test bold).
    Plots without data are skipped.

    Args:
        records: Metrics records (as read from ``metrics.jsonl``).
        out_dir: Output directory; created if missing.

    Returns:
        Paths of the PNGs written, in the order above.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    loss = _plot_loss(records, out_dir)
    if loss is not None:
        written.append(loss)
    for metric in GENERATION_METRICS:
        path = _plot_metric(records, metric, out_dir)
        if path is not None:
            written.append(path)
    harness = _plot_harness(records, out_dir)
    if harness is not None:
        written.append(harness)
    return written
