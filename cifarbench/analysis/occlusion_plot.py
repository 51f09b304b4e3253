"""Figures for occlusion maps: the image, then per K the map over the image with the worst patch outlined.

What a paper needs from them: a perceptual colormap (viridis for ``p(target)``, magma for the drop), one colour
scale shared by every K of a figure (so K=4 and K=12 can be compared by eye; ``shared_scale=False`` gives each
its own), a labelled colorbar, the map drawn half-transparent over a grey copy of the image so the image stays
readable, and a title naming the model, the target class (the *prediction* unless a label was given) and the
true label when it is known.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

#: colormaps by what is shown (perceptually uniform; jet invents edges where the data has none)
CMAPS = {"prob": "viridis", "drop": "magma"}
LABELS = {"prob": "p(target)", "drop": "drop in p(target) (clean − occluded)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _class_name(classes, index) -> str:
    if classes is not None and 0 <= index < len(classes):
        return str(classes[index])
    from ..data import CLASSES

    return CLASSES[index] if 0 <= index < len(CLASSES) else str(index)


def _hwc(image) -> np.ndarray:
    img = np.asarray(image.cpu() if hasattr(image, "cpu") else image)
    img = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
    return img.transpose(1, 2, 0)


def _values(r, show: str) -> np.ndarray:
    return (r.clean_prob - r.map) if show == "drop" else r.map


def _scale(results, show: str, shared: bool):
    """(vmin, vmax) per result: one range over all of them (shared), else each its own."""
    def own(r):
        v = _values(r, show)
        if show == "drop":
            return min(0.0, float(v.min())), max(float(v.max()), 1e-6)
        return 0.0, max(r.clean_prob, float(v.max()), 1e-6)

    ranges = [own(r) for r in results]
    if shared and ranges:
        lo, hi = min(a for a, _ in ranges), max(b for _, b in ranges)
        return [(lo, hi)] * len(ranges)
    return ranges


def _opaque(im):
    """The overlay's colours at full strength, for its colorbar (the overlay itself is half transparent)."""
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=im.norm, cmap=im.get_cmap())


def _draw_map(ax, img, r, show, vmin, vmax, alpha):
    from matplotlib.patches import Rectangle

    size = img.shape[0]
    half = r.k / 2 - 0.5
    span = (r.map.shape[1] - 1) * r.stride
    grey = img.mean(axis=2)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    im = ax.imshow(_values(r, show), cmap=CMAPS[show], alpha=alpha, vmin=vmin, vmax=vmax,
                   extent=(half - r.stride / 2, half + span + r.stride / 2,
                           half + span + r.stride / 2, half - r.stride / 2), interpolation="nearest")
    worst = r.most_damaging
    ax.add_patch(Rectangle((worst["x"] - 0.5, worst["y"] - 0.5), r.k, r.k, fill=False, edgecolor="white",
                           linewidth=2, linestyle="--"))
    ax.set_xlim(-0.5, size - 0.5)
    ax.set_ylim(size - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def occlusion_title(results, model: str | None = None, true_label: str | None = None, classes=None,
                    image: str | None = None) -> str:
    first = results[0]
    parts = [f"occlusion of {image}" if image else "occlusion"]
    if model:
        parts.append(f"model {model}")
    target = _class_name(classes, first.target)
    parts.append(f"target {target} ({'prediction' if first.target == first.predicted else 'given'})")
    if true_label is not None:
        parts.append(f"true {true_label}")
    return ", ".join(parts)


def plot_occlusion(image, results: list, path: str | Path, title: str | None = None, **kwargs) -> Path:
    """Draw :func:`occlusion_figure` and write it to ``path`` (PNG, atomically, title in its metadata)."""
    return _save(occlusion_figure(image, results, title, **kwargs), path)


def occlusion_figure(image, results: list, title: str | None = None, *, model: str | None = None,
                     true_label: str | None = None, classes=None, show: str = "prob", shared_scale: bool = True,
                     alpha: float = 0.6, caption: str | None = None):
    """One PNG for one image and any number of K (``results``: :class:`OcclusionResult` s of that image).

    ``show``: ``"prob"`` (the map of p(target)) or ``"drop"`` (clean minus occluded). ``shared_scale``: one
    colour scale for every K (default), else one per K. ``model`` and ``true_label`` go into the title (with
    ``title``, which is kept as given, e.g. the image's name); ``caption`` (e.g.
    :func:`cifarbench.provenance.caption`) is written under the figure. Each map cell is drawn at the centre of
    its patch, so the heatmap lines up with the pixels it describes; the dashed box is the most damaging patch.
    """
    if show not in CMAPS:
        raise ValueError(f"show must be one of {sorted(CMAPS)}, not {show!r}")
    plt = _plt()
    img = _hwc(image)
    first = results[0]
    ranges = _scale(results, show, shared_scale)
    fig, axes = plt.subplots(1, 1 + len(results), figsize=(3.3 * (1 + len(results)), 3.9), squeeze=False,
                             layout="constrained")
    ax = axes[0, 0]
    ax.imshow(img, interpolation="nearest")
    pred = _class_name(classes, first.predicted)
    ax.set_title(f"predicted {pred}\np({_class_name(classes, first.target)})={first.clean_prob:.3f}", fontsize=9)
    ax.axis("off")
    ims = []
    for ax, r, (vmin, vmax) in zip(axes[0, 1:], results, ranges):
        ims.append(_draw_map(ax, img, r, show, vmin, vmax, alpha))
        worst = r.most_damaging
        ax.set_title(f"K={r.k} {patch_name(r.baseline)} patch, stride {r.stride}\n"
                     f"sum={r.map_sum:.2f} min p={worst['prob']:.3f}", fontsize=9)
        if not shared_scale:
            fig.colorbar(_opaque(ims[-1]), ax=ax, fraction=0.046, pad=0.04).set_label(LABELS[show], fontsize=8)
    if shared_scale and ims:
        fig.colorbar(_opaque(ims[-1]), ax=list(axes[0, 1:]), fraction=0.046, pad=0.02).set_label(LABELS[show])
    head = occlusion_title(results, model, true_label, classes)
    fig.suptitle(f"{title} — {head}" if title else head, fontsize=10)
    _caption(fig, caption)
    return fig


def patch_name(baseline) -> str:
    """What the patch is filled with: ``gray`` (0.5), ``black``, ``white``, else its RGB in [0, 1]."""
    values = [round(float(v), 3) for v in np.atleast_1d(np.asarray(baseline if baseline is not None else 0.5))]
    if len(set(values)) == 1 and values[0] in (0.0, 0.5, 1.0):
        return {0.0: "black", 0.5: "gray", 1.0: "white"}[values[0]]
    return "(" + ",".join(f"{v:g}" for v in values) + ")"


def _caption(fig, caption) -> None:
    from .figures import add_caption

    add_caption(fig, caption)


def plot_occlusion_grid(items: list, path: str | Path, **kwargs) -> Path:
    """Draw :func:`occlusion_grid_figure` and write it to ``path``."""
    return _save(occlusion_grid_figure(items, **kwargs), path)


def occlusion_grid_figure(items: list, *, model: str | None = None, classes=None, show: str = "prob",
                          columns: int = 6, alpha: float = 0.6, caption: str | None = None,
                          title: str | None = None):
    """Many images in one figure, one colour scale: ``items`` are ``(image, result, true_label_or_None, name)``
    (one K each). Each tile is the map over the image, titled with the name, the prediction and the true label;
    a red name marks a wrong prediction."""
    if show not in CMAPS:
        raise ValueError(f"show must be one of {sorted(CMAPS)}, not {show!r}")
    if not items:
        raise ValueError("plot_occlusion_grid needs at least one image")
    plt = _plt()
    columns = max(1, min(columns, len(items)))
    rows = -(-len(items) // columns)
    (vmin, vmax), = set(_scale([r for _, r, _, _ in items], show, True))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns + 1, 2.4 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    im = None
    for ax, (image, r, true_label, name) in zip(axes.flat, items):
        im = _draw_map(ax, _hwc(image), r, show, vmin, vmax, alpha)
        pred = _class_name(classes, r.predicted)
        wrong = true_label is not None and true_label != pred
        label = f"{name}\npred {pred}" + (f", true {true_label}" if true_label is not None else "")
        ax.set_title(label, fontsize=7, color="tab:red" if wrong else "black")
    fig.colorbar(_opaque(im), ax=list(axes.flat), fraction=0.03, pad=0.02).set_label(LABELS[show])
    k = sorted({r.k for _, r, _, _ in items})
    first = items[0][1]
    target = ("each image's prediction" if all(r.target == r.predicted for _, r, _, _ in items)
              else f"p({_class_name(classes, first.target)})")
    head = (f"occlusion maps, K={','.join(map(str, k))} {patch_name(first.baseline)} patch"
            + (f", model {model}" if model else "") + f", target {target}")
    fig.suptitle(f"{title} — {head}" if title else head, fontsize=10)
    _caption(fig, caption)
    return fig


def _save(fig, path) -> Path:
    from .figures import save_figure

    return save_figure(fig, path, dpi=100)
