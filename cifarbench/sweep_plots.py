"""A sweep's figures: test accuracy per epoch for every run, and the grouped means as the report drew them.

One convention for every number shown: accuracies in percent with :data:`DECIMALS` decimals and a ``%`` sign
(:func:`percent`), as the live table and the summary tables; axis ticks get as many decimals as their spacing needs
to be distinct. With few epochs (a smoke run, ``--epochs 1``) a line plot is a row of lone dots on an axis
running 0.96–1.04; those figures draw points (one epoch: bars per run) instead, and their titles say so.

A figure has one title: ``title`` is its subject (model and data, e.g. ``net1 · synthetic:200``) and the plot adds
what it draws (``net1 · synthetic:200 — test accuracy of 4 runs at epochs 1, 2``).

matplotlib is imported inside the functions (Agg backend) so the CLI starts fast and runs without a display.
"""
from __future__ import annotations

import math
from pathlib import Path


#: at most this many distinct epochs: draw points (markers, integer ticks) rather than curves
FEW_EPOCHS = 3
#: decimals of a percentage shown to a person (tables, pages, bar labels)
DECIMALS = 2
#: the smallest span of a percent axis (a fraction: one percentage point), so float32 noise (1e-9) between equal
#: accuracies is not stretched over the whole axis
MIN_SPAN = 0.01


def percent(fraction, decimals: int = 1) -> str:
    """``0.1142`` -> ``"11.4"``: an accuracy (or an accuracy gap) in percent, never ``"-0.0"``."""
    if fraction is None:
        return ""
    return f"{round(100 * float(fraction), decimals) + 0.0:.{decimals}f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, caption: str | None = None) -> None:
    from .analysis.figures import save_figure

    save_figure(fig, path, dpi=120, caption=caption)


def tick_decimals(locs, most: int = 6) -> int:
    """The fewest decimals that write every tick (a fraction, shown in percent) exactly, so no two read alike:
    ticks 0.1100, 0.1125, 0.1150 -> 2 (``11.00%``, ``11.25%``, ``11.50%``)."""
    values = [100 * float(v) for v in locs if math.isfinite(v)]
    for d in range(most + 1):
        if all(abs(v - round(v, d)) <= 1e-9 * max(1.0, abs(v)) for v in values):
            return d
    return most


def _percent_formatter():
    from matplotlib.ticker import Formatter

    class PercentTicks(Formatter):
        """``0.1125`` -> ``"11.25%"``, with the decimals the tick spacing needs (:func:`tick_decimals`)."""

        decimals = 0

        def set_locs(self, locs):
            super().set_locs(locs)
            self.decimals = tick_decimals(locs)

        def __call__(self, x, pos=None):
            return f"{percent(x, self.decimals)}%"

    return PercentTicks()


def _percent_axis(ax, axis: str = "y") -> None:
    """Ticks in percent, distinct; an axis of (nearly) equal values widened to :data:`MIN_SPAN` about them."""
    which = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if hi - lo < MIN_SPAN:
        mid = (lo + hi) / 2
        lo, hi = mid - MIN_SPAN / 2, mid + MIN_SPAN / 2
        if lo < 0:
            lo, hi = 0.0, MIN_SPAN
        (ax.set_ylim if axis == "y" else ax.set_xlim)(lo, hi)
    which.set_major_formatter(_percent_formatter())


def _legend(ax, n: int) -> None:
    if n == 0:
        return
    if n <= 30:
        ax.legend(fontsize=8 if n <= 12 else 7, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  ncols=1 if n <= 15 else 2, frameon=False)


def _title(ax, title: str | None, head: str) -> None:
    ax.set_title(f"{title} — {head}" if title else head, fontsize=11)


def _runs(n: int) -> str:
    return f"{n} run{'s' if n != 1 else ''}"


def _bar_labels(ax, bars, values) -> None:
    ax.bar_label(bars, labels=[f"{percent(v, DECIMALS)}%" for v in values], fontsize=8)


def plot_curves(rows: list[dict], path: str | Path, *, title: str | None = None, caption: str | None = None) -> None:
    """Test accuracy against epoch for every run (the report's per-run curves, all on one axis): one line per run,
    points when the runs have at most :data:`FEW_EPOCHS` epochs, one bar per run when they have one; the title
    (after ``title``, the subject) says which."""
    plt = _pyplot()
    from .analysis.figures import add_caption

    runs: dict[str, list[dict]] = {}
    for row in rows:
        runs.setdefault(row["name"], []).append(row)
    epochs = sorted({r["epoch"] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 5))
    if len(epochs) == 1:
        names = list(runs)
        values = [max(runs[n], key=lambda r: r["epoch"])["test_accuracy"] for n in names]
        bars = ax.bar(range(len(names)), values, color="tab:blue")
        _bar_labels(ax, bars, values)
        ax.margins(y=0.08)  # room for the labels above the bars
        ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 4 else 0, ha="right" if
                      len(names) > 4 else "center", fontsize=8)
        ax.set_xlabel(f"run (epoch {epochs[0]})")
        head = f"test accuracy of {_runs(len(runs))}"  # the x label names the epoch
    else:
        few = len(epochs) <= FEW_EPOCHS
        for name, rs in runs.items():
            rs = sorted(rs, key=lambda r: r["epoch"])
            ax.plot([r["epoch"] for r in rs], [r["test_accuracy"] for r in rs], marker="o",
                    markersize=6 if few else 2, linewidth=0.8 if few else 1.2, linestyle=":" if few else "-",
                    label=name)
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs) if few else ax.xaxis.get_major_locator().set_params(integer=True)
        if few:
            ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
            head = f"test accuracy of {_runs(len(runs))} at epochs {', '.join(map(str, epochs))}"
        else:
            head = f"test accuracy by epoch, one line per run ({_runs(len(runs))})"
        _legend(ax, len(runs))
    _percent_axis(ax)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    _title(ax, title, head)
    add_caption(fig, caption)
    _save(fig, Path(path), caption)


def plot_grouped(table: list[dict], keys: list[str], path: str | Path, *, title: str | None = None,
                 caption: str | None = None) -> None:
    """Grouped means: by epoch a line per metric; by one key bars of train and test accuracy; by a pair, test
    accuracy bars for the second key's values side by side over the first key's. ``title`` is the subject (model
    and data); the figure adds what it shows."""
    plt = _pyplot()
    from .analysis.figures import add_caption

    fig, ax = plt.subplots(figsize=(8, 4.2))
    if list(keys) == ["epoch"]:
        xs = [r["epoch"] for r in table]
        few = len(set(xs)) <= FEW_EPOCHS
        for metric in ("train_accuracy", "test_accuracy"):
            ax.plot(xs, [r[metric] for r in table], marker="o", markersize=6 if few else 3,
                    linestyle=":" if few else "-", label=metric.replace("_", " "))
        ax.set_xlabel("epoch")
        if few:
            ax.set_xticks(sorted(set(xs)))
            ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        runs = max((r.get("runs") or 0 for r in table), default=0)
        head = "mean train and test accuracy by epoch" + (f", over {_runs(runs)}" if runs else "")
    else:
        first = list(dict.fromkeys(r[keys[0]] for r in table))
        if len(keys) == 1:
            series = {m.replace("_", " "): {r[keys[0]]: r[m] for r in table}
                      for m in ("train_accuracy", "test_accuracy")}
        else:
            series = {}
            for r in table:
                series.setdefault(f"{keys[1]}={r[keys[1]]}", {})[r[keys[0]]] = r["test_accuracy"]
        width = 0.8 / len(series)
        label_bars = len(series) * len(first) <= 12  # more bars are too narrow for their labels
        for j, (label, values) in enumerate(series.items()):
            xs = [i + (j - (len(series) - 1) / 2) * width for i, v in enumerate(first) if v in values]
            heights = [values[v] for v in first if v in values]
            bars = ax.bar(xs, heights, width=width, label=label)
            if label_bars:
                _bar_labels(ax, bars, heights)
        ax.margins(y=0.08)
        ax.set_xticks(range(len(first)), [str(v) for v in first])
        ax.set_xlabel(keys[0])
        what = "train and test accuracy" if len(keys) == 1 else "test accuracy"
        head = f"mean {what} by {' × '.join(keys)}, over all epochs of all runs"
    _percent_axis(ax)
    ax.set_ylabel("mean accuracy" if len(keys) == 1 else "mean test accuracy")
    _title(ax, title, head)
    ax.grid(alpha=0.3, axis="y")
    if list(keys) == ["epoch"]:
        ax.legend(fontsize=8, frameon=False, loc="best")
    else:  # beside the axes: inside, it would cover the bars' labels
        ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    add_caption(fig, caption)
    _save(fig, Path(path), caption)
