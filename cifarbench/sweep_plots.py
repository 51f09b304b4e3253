"""A sweep's figures: test accuracy per epoch for every run, and the grouped means as the report drew them.

One convention for every number shown: accuracies in percent, rounded to one decimal (:func:`percent`), the same
as the live table. With few epochs (a smoke run, ``--epochs 1``) a line plot is a row of lone dots on an axis
running 0.96–1.04; those figures draw points (one epoch: bars per run) instead.

matplotlib is imported inside the functions (Agg backend) so the CLI starts fast and runs without a display.
"""
from __future__ import annotations

from pathlib import Path


#: at most this many distinct epochs: draw points (markers, integer ticks) rather than curves
FEW_EPOCHS = 3


def percent(fraction, decimals: int = 1) -> str:
    """``0.1142`` -> ``"11.4"``: the one way a sweep shows an accuracy (or an accuracy gap) to a person."""
    if fraction is None:
        return ""
    return f"{100 * float(fraction):.{decimals}f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, caption: str | None = None) -> None:
    from .analysis.figures import save_figure

    save_figure(fig, path, dpi=120, caption=caption)


def _percent_axis(ax, axis: str = "y") -> None:
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{100 * v:.0f}%")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def _legend(ax, n: int) -> None:
    if n == 0:
        return
    if n <= 30:
        ax.legend(fontsize=8 if n <= 12 else 7, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  ncols=1 if n <= 15 else 2, frameon=False)


def plot_curves(rows: list[dict], path: str | Path, *, title: str | None = None, caption: str | None = None) -> None:
    """One line per run: test accuracy against epoch (the report's per-run curves, all on one axis); points when
    the runs have at most :data:`FEW_EPOCHS` epochs, bars when they have one."""
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
        ax.bar_label(bars, labels=[percent(v) for v in values], fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 4 else 0, ha="right" if
                      len(names) > 4 else "center", fontsize=8)
        ax.set_xlabel(f"run (epoch {epochs[0]})")
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
        _legend(ax, len(runs))
    _percent_axis(ax)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    head = f"test accuracy of {len(runs)} run{'s' if len(runs) != 1 else ''}"
    ax.set_title(f"{title} — {head}" if title else head)
    add_caption(fig, caption)
    _save(fig, Path(path), caption)


def plot_grouped(table: list[dict], keys: list[str], path: str | Path, *, title: str | None = None,
                 caption: str | None = None) -> None:
    """Grouped means: by epoch a line per metric; by one key bars of train and test accuracy; by a pair, test
    accuracy bars for the second key's values side by side over the first key's."""
    plt = _pyplot()
    from .analysis.figures import add_caption

    fig, ax = plt.subplots(figsize=(7, 4))
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
        for j, (label, values) in enumerate(series.items()):
            xs = [i + (j - (len(series) - 1) / 2) * width for i, v in enumerate(first) if v in values]
            ax.bar(xs, [values[v] for v in first if v in values], width=width, label=label)
        ax.set_xticks(range(len(first)), [str(v) for v in first])
        ax.set_xlabel(keys[0])
    _percent_axis(ax)
    ax.set_ylabel("mean accuracy" if len(keys) == 1 else "mean test accuracy")
    head = f"mean over all epochs of all runs, by {' x '.join(keys)}"
    ax.set_title(f"{title} — {head}" if title else head)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, frameon=False)
    add_caption(fig, caption)
    _save(fig, Path(path), caption)
