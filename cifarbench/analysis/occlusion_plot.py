"""Figures for occlusion maps: the image, then per K the map over the image with the worst patch outlined."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_occlusion(image, results: list, path: str | Path, title: str | None = None) -> None:
    """One PNG for one image and any number of K (``results``: :class:`OcclusionResult` s of that image).

    Each map cell is drawn at the centre of its patch, so the heatmap lines up with the pixels it describes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ..data import CLASSES
    from ..io import atomic_path

    img = np.asarray(image.cpu() if hasattr(image, "cpu") else image, dtype=np.float32).transpose(1, 2, 0)
    first = results[0]
    fig, axes = plt.subplots(1, 1 + len(results), figsize=(3.2 * (1 + len(results)), 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.imshow(img, interpolation="nearest")
    ax.set_title(f"predicted {CLASSES[first.predicted]}\ntarget {CLASSES[first.target]} p={first.clean_prob:.3f}",
                 fontsize=9)
    ax.axis("off")
    for ax, r in zip(axes[0, 1:], results):
        half = r.k / 2 - 0.5
        span = (r.map.shape[1] - 1) * r.stride
        ax.imshow(img, interpolation="nearest")
        im = ax.imshow(r.map, cmap="jet", alpha=0.55, vmin=float(r.map.min()), vmax=max(r.clean_prob, float(r.map.max())),
                       extent=(half - r.stride / 2, half + span + r.stride / 2,
                               half + span + r.stride / 2, half - r.stride / 2), interpolation="nearest")
        worst = r.most_damaging
        ax.add_patch(Rectangle((worst["x"] - 0.5, worst["y"] - 0.5), r.k, r.k, fill=False, edgecolor="white",
                               linewidth=2))
        ax.set_xlim(-0.5, 31.5)
        ax.set_ylim(31.5, -0.5)
        ax.set_title(f"K={r.k} stride={r.stride}\nsum={r.map_sum:.2f} min={worst['prob']:.3f}", fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
