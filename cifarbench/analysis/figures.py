"""PNG figures for ablation and mining results (matplotlib, Agg backend, written atomically)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def _hwc(image) -> np.ndarray:
    """uint8 [3, H, W] (tensor or array) -> [H, W, 3] for imshow."""
    return np.asarray(image).transpose(1, 2, 0)


def confusion_figure(before, after, classes, path) -> Path:
    """Before, after and after - before confusion matrices side by side, counts written in the cells."""
    before, after = np.asarray(before), np.asarray(after)
    diff = after - before
    lim = max(1, int(np.abs(diff).max()))
    return _confusion_panels([(before, "before", "Blues", 0, None), (after, "after", "Blues", 0, None),
                              (diff, "after - before", "RdBu", -lim, lim)], classes, path)


def single_confusion_figure(conf, classes, path, title: str = "confusion matrix") -> Path:
    return _confusion_panels([(np.asarray(conf), title, "Blues", 0, None)], classes, path)


def _confusion_panels(panels, classes, path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.3 * len(panels), 6), squeeze=False)
    for ax, (mat, title, cmap, vmin, vmax) in zip(axes[0], panels):
        ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(title)
        ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    return _save(fig, path)


def flipped_grid(images, items: list[dict], path, columns: int = 8) -> Path:
    """Images right before and wrong after the ablation, titled with the label and both predictions."""
    plt = _plt()
    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item, image in zip(axes.flat, items, images):
        ax.imshow(_hwc(image), interpolation="nearest")
        ax.set_title(f"#{item['index']} {item['label']}\n{item['before']} -> {item['after']}", fontsize=8)
    if not items:
        axes.flat[0].text(0.5, 0.5, "no image flipped from right to wrong", ha="center", va="center")
    return _save(fig, path)


def sweep_figure(result: dict, path, top: int = 30) -> Path:
    """The ``top`` filters by accuracy drop (bars), and the distribution of drops over every swept filter."""
    plt = _plt()
    rows = result["filters"]
    shown = rows[:top]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, max(4, 0.28 * len(shown) + 1)),
                                   gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"{r['layer']}:{r['filter']}" for r in shown][::-1]
    ax1.barh(labels, [100 * r["drop"] for r in shown][::-1], color="tab:red")
    ax1.set_xlabel("overall accuracy drop (percentage points)")
    ax1.set_title(f"top {len(shown)} of {len(rows)} filters by accuracy drop")
    ax2.hist([100 * r["drop"] for r in rows], bins=40, color="tab:gray")
    ax2.set_xlabel("accuracy drop (percentage points)")
    ax2.set_ylabel("filters")
    ax2.set_title(f"all swept filters ({', '.join(result['layers'])})")
    return _save(fig, path)


def mining_figure(images, entry: dict, path) -> Path:
    """One filter: each top image with its max-response patch outlined, and the patch crop beside it."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    top = entry["top"]
    n = max(1, len(top))
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 4.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (item, image) in enumerate(zip(top, images)):
        y0, x0, y1, x1 = item["patch"]
        img = _hwc(image)
        axes[0, k].imshow(img, interpolation="nearest")
        axes[0, k].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=1.5))
        axes[0, k].set_title(f"#{item['index']} {item['label']}\nr={item['response']:.3g}", fontsize=8)
        axes[1, k].imshow(img[y0:y1, x0:x1], interpolation="nearest")
        axes[1, k].set_title(f"patch {y1 - y0}x{x1 - x0}", fontsize=8)
    fig.suptitle(f"{entry['layer']} filter {entry['filter']}: top {len(top)} images and max-response patches")
    return _save(fig, path)
