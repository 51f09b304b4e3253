"""A sweep's figures: test accuracy per epoch for every run, and the grouped means as the report drew them.

matplotlib is imported inside the functions (Agg backend) so the CLI starts fast and runs without a display.
"""
from __future__ import annotations

from pathlib import Path

from .io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_curves(rows: list[dict], path: str | Path) -> None:
    """One line per run: test accuracy against epoch (the report's per-run curves, all on one axis)."""
    plt = _pyplot()
    runs: dict[str, list[dict]] = {}
    for row in rows:
        runs.setdefault(row["name"], []).append(row)
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, rs in runs.items():
        rs = sorted(rs, key=lambda r: r["epoch"])
        ax.plot([r["epoch"] for r in rs], [r["test_accuracy"] for r in rs], marker="o", markersize=2,
                linewidth=1, label=name)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    if len(runs) <= 30:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, Path(path))
    plt.close(fig)


def plot_grouped(table: list[dict], keys: list[str], path: str | Path) -> None:
    """Grouped means: by epoch a line per metric; by one key bars of train and test accuracy; by a pair, test
    accuracy bars for the second key's values side by side over the first key's."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if list(keys) == ["epoch"]:
        xs = [r["epoch"] for r in table]
        for metric in ("train_accuracy", "test_accuracy"):
            ax.plot(xs, [r[metric] for r in table], marker="o", markersize=3, label=metric)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        first = list(dict.fromkeys(r[keys[0]] for r in table))
        if len(keys) == 1:
            series = {m: {r[keys[0]]: r[m] for r in table} for m in ("train_accuracy", "test_accuracy")}
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
    ax.set_ylabel("mean accuracy" if len(keys) == 1 else "mean test accuracy")
    ax.set_title(f"mean over all epochs of all runs, by {' x '.join(keys)}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    _save(fig, Path(path))
    plt.close(fig)
