"""PNG figures for ablation and mining results (matplotlib, Agg backend, written atomically).

Every figure has a title that says what was changed (the zeroed filters, the mined filter) and takes an optional
``title`` (e.g. the model) and ``caption`` (e.g. :func:`cifarbench.provenance.caption`: model, digest, data,
backend), written under the figure. The title and caption also go into the PNG's ``Title``/``Description``
metadata, so a file says what it is even when cropped out of its page. Each ``*_figure(..., path)`` function
has a ``*_fig`` twin (without ``path``) that returns the matplotlib Figure, for tests and notebooks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_title(fig) -> str:
    """The figure's suptitle, else its first axes title (what the PNG metadata records)."""
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_text():
        return sup.get_text()
    for ax in fig.axes:
        if ax.get_title():
            return ax.get_title()
    return ""


def save_figure(fig, path: str | Path, dpi: int = 110, caption: str | None = None) -> Path:
    """Write ``fig`` as PNG atomically, its title and caption in the PNG metadata, and close it."""
    import warnings

    path = Path(path)
    with warnings.catch_warnings():
        # a file name in a script DejaVu Sans lacks (CJK, say) draws as boxes in a title; matplotlib's four-line
        # warning per glyph would bury the command's one-line output, and the PNG metadata keeps the real text
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        _tuck_caption(fig)
        meta = {"Title": figure_title(fig), "Software": "cifarbench"}
        text = caption or getattr(fig, "_cifarbench_caption", None)
        if text:
            meta["Description"] = text
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata=meta)
    _plt().close(fig)
    return path


def _save(fig, path: str | Path) -> Path:
    return save_figure(fig, path)


def add_caption(fig, caption: str | None) -> None:
    """A small grey line under the figure (saved with ``bbox_inches="tight"``, so it is kept); :func:`save_figure`
    moves it up to just below the lowest drawn thing, so no band of white separates it from the figure."""
    if caption:
        caption = tidy_caption(caption)
        # wrapped by _tuck_caption, not by matplotlib: its wrap=True grows a top-aligned text upwards, over the axes
        fig._cifarbench_caption_artist = fig.text(0.5, -0.01, caption, ha="center", va="top", fontsize=7,
                                                  color="0.35")
        fig._cifarbench_caption = caption


def tidy_caption(text: str) -> str:
    """``test[slice(0, 500, None)]`` (a data subset's identity) as ``test[0:500]``: a caption is read by people."""
    import re

    return re.sub(r"slice\((\w+), (\w+), None\)",
                  lambda m: ":".join("" if v == "None" else v for v in m.groups()), text)


def _tuck_caption(fig) -> None:
    artist = getattr(fig, "_cifarbench_caption_artist", None)
    if artist is None:
        return
    fig.canvas.draw()   # runs the layout engine, so the axes sit where they will be saved ...
    if fig.get_layout_engine() is not None:
        fig.set_layout_engine("none")   # ... and stay there: a second pass moves constrained axes a little
    renderer = fig.canvas.get_renderer()
    lows = []
    for ax in fig.axes:
        if not ax.get_visible() or not (ax.axison or ax.has_data() or ax.get_title()):
            continue   # an empty, switched-off grid cell draws nothing
        box = ax.get_tightbbox(renderer)
        if box is not None and box.height > 0:
            lows.append(box.y0)
    if lows:
        artist.set_y(min(lows) / fig.bbox.height - 0.01)
    wide = artist.get_window_extent(renderer).width
    if wide > fig.bbox.width:   # wrap to the figure's width, at the caption's " · " joints where it can
        import textwrap

        text = artist.get_text()
        chars = max(20, int(max(map(len, text.splitlines())) * fig.bbox.width / wide * 0.95))
        lines = []
        for line in text.splitlines():
            parts = [p for part in line.split(" · ") for p in textwrap.wrap(part, chars) or [""]]
            row = parts[0]
            for part in parts[1:]:
                if len(row) + 3 + len(part) <= chars:
                    row += " · " + part
                else:
                    lines.append(row)
                    row = part
            lines.append(row)
        artist.set_text("\n".join(lines))


def filters_text(filters, limit: int = 8) -> str:
    """``conv1:0,1 conv2:0`` from ``[{"layer", "filter"}, ...]`` (or ``(layer, j)`` pairs), shortened past
    ``limit`` filters to ``... (+N more)``."""
    by_layer: dict[str, list] = {}
    for f in filters or ():
        layer, j = (f["layer"], f["filter"]) if isinstance(f, dict) else f
        by_layer.setdefault(str(layer), []).append(j)
    parts, shown = [], 0
    for layer, js in by_layer.items():
        take = js[:max(0, limit - shown)]
        if take:
            parts.append(f"{layer}:{','.join(map(str, take))}")
        shown += len(take)
    total = sum(len(js) for js in by_layer.values())
    return " ".join(parts) + (f" ... (+{total - shown} more)" if total > shown else "")


def change_text(change: dict | None, kind: str = "gain", pct: bool = True) -> str:
    """A per-class change for a table: ``bird +1.20`` (percentage points), or ``none`` when no class gained
    (``kind="gain"``) or lost (``kind="loss"``): "largest gain bird 0.00" would name a class that did not gain."""
    if not change or change.get("class") is None:
        return "none"
    value = float(change["change"])
    if (kind == "gain" and value <= 0) or (kind == "loss" and value >= 0):
        return "none"
    return f"{change['class']} {100 * value if pct else value:+.2f}"


def _hwc(image) -> np.ndarray:
    """uint8 [3, H, W] (tensor or array) -> [H, W, 3] for imshow."""
    return np.asarray(image).transpose(1, 2, 0)


def confusion_figure(before, after, classes, path, *, filters=None, title: str | None = None,
                     caption: str | None = None) -> Path:
    """Before, after and after - before confusion matrices side by side, counts written in the cells, each with
    a colorbar; the title names the zeroed ``filters`` (``[{"layer", "filter"}, ...]``)."""
    return _save(confusion_fig(before, after, classes, filters=filters, title=title, caption=caption), path)


def confusion_fig(before, after, classes, *, filters=None, title: str | None = None, caption: str | None = None):
    before, after = np.asarray(before), np.asarray(after)
    diff = after - before
    lim = max(1, int(np.abs(diff).max()))
    vmax = max(1, int(max(before.max(initial=0), after.max(initial=0))))  # before and after on one scale
    head = "confusion matrices before and after zeroing " + (filters_text(filters) if filters else "the filters")
    return _confusion_panels([(before, "before (count)", "Blues", 0, vmax), (after, "after (count)", "Blues", 0, vmax),
                              (diff, "after − before (count)", "RdBu", -lim, lim)], classes,
                             f"{title}: {head}" if title else head, caption)


def single_confusion_figure(conf, classes, path, title: str = "confusion matrix", *,
                            caption: str | None = None) -> Path:
    return _save(_confusion_panels([(np.asarray(conf), "count", "Blues", 0, None)], classes, title, caption), path)


def _confusion_panels(panels, classes, suptitle=None, caption=None):
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(6.6 * len(panels), 6.4), squeeze=False, layout="constrained")
    for n, (ax, (mat, label, cmap, vmin, vmax)) in enumerate(zip(axes[0], panels)):
        im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(label.replace(" (count)", ""))
        ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
        ax.set_xlabel("predicted")
        if n == 0:  # one y axis for the row: the later panels' "true" label sat on the class names
            ax.set_yticks(range(len(classes)), classes)
            ax.set_ylabel("true")
        else:
            ax.set_yticks(range(len(classes)), [""] * len(classes))
        lo, hi = im.get_clim()
        for (i, j), v in np.ndenumerate(mat):  # white on the darkest cells, so every count stays readable
            dark = abs(v) > 0.6 * max(abs(lo), abs(hi)) if lo < 0 else v > lo + 0.6 * (hi - lo)
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if dark else "black")
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        bar.set_label(label)
        bar.locator = MaxNLocator(integer=True)   # counts: no 0.25 steps on a -1..1 difference
        bar.update_ticks()
    if suptitle:
        fig.suptitle(suptitle)
    add_caption(fig, caption)
    return fig


def flipped_grid(images, items: list[dict], path, columns: int = 8, *, filters=None, title: str | None = None,
                 caption: str | None = None) -> Path:
    """Images right before and wrong after the ablation, titled with the label and both predictions."""
    return _save(flipped_fig(images, items, columns, filters=filters, title=title, caption=caption), path)


def flipped_fig(images, items: list[dict], columns: int = 8, *, filters=None, title: str | None = None,
                caption: str | None = None):
    plt = _plt()
    columns = max(1, min(columns, len(items)))
    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(max(2 * columns, 4.5), 2.3 * rows + 0.5), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, item, image in zip(axes.flat, items, images):
        ax.imshow(_hwc(image), interpolation="nearest")
        ax.set_title(f"#{item['index']} {item['label']}\n{item['before']} -> {item['after']}", fontsize=8)
    if not items:
        axes.flat[0].text(0.5, 0.5, "no image flipped from right to wrong", ha="center", va="center")
    head = (f"{len(items)} image{'' if len(items) == 1 else 's'} right before and wrong after zeroing "
            + (filters_text(filters) if filters else "the filters"))
    fig.suptitle((f"{title}: {head}" if title else head) + "\n(#index true label, prediction before -> after)",
                 fontsize=10)
    add_caption(fig, caption)
    return fig


def sweep_figure(result: dict, path, top: int = 30, *, title: str | None = None, caption: str | None = None) -> Path:
    """The ``top`` filters by accuracy drop (bars), and the distribution of drops over every swept filter."""
    return _save(sweep_fig(result, top, title=title, caption=caption), path)


def sweep_fig(result: dict, top: int = 30, *, title: str | None = None, caption: str | None = None):
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
    from matplotlib.ticker import MaxNLocator

    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))  # a count of filters: no 0.25 steps
    ax2.set_title(f"all swept filters ({', '.join(result['layers'])})")
    head = f"each filter of {', '.join(result['layers'])} zeroed on its own: accuracy drop (before − after)"
    fig.suptitle(f"{title}: {head}" if title else head)
    add_caption(fig, caption)
    return fig


def mining_figure(images, entry: dict, path, *, receptive_field: int | list[int] | None = None,
                  title: str | None = None, caption: str | None = None, total: int | None = None) -> Path:
    """One filter: each top image with its max-response patch outlined, and the patch crop beneath it."""
    return _save(mining_fig(images, entry, receptive_field=receptive_field, title=title, caption=caption,
                            total=total), path)


def mining_fig(images, entry: dict, *, receptive_field: int | list[int] | None = None,
               title: str | None = None, caption: str | None = None, total: int | None = None):
    """Patches are drawn at one scale: each sits in a window of the receptive field's size (``receptive_field``,
    else the largest patch shown), so a patch clipped at the image border is drawn smaller, on the side away
    from the border, not stretched. Filters whose top responses are all negative are flagged in the title.
    ``title`` (e.g. the model) comes first; ``total``: how many top images were mined, when more than shown."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    top = entry["top"]
    n = max(1, len(top))
    known = [t["patch"] for t in top if t.get("patch") is not None]
    # the window is the receptive field, per axis where it is not square ([height, width]), else the largest patch
    rf_h, rf_w = (receptive_field if isinstance(receptive_field, (list, tuple)) else
                  (receptive_field or 0, receptive_field or 0))
    win_h = max([rf_h or 0, *(p[2] - p[0] for p in known), 1])
    win_w = max([rf_w or 0, *(p[3] - p[1] for p in known), 1])
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 4.6), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for k, (item, image) in enumerate(zip(top, images)):
        img = _hwc(image)
        axes[0, k].imshow(img, interpolation="nearest")
        axes[0, k].set_title(f"#{item['index']} {item['label']}\nr={item['response']:.3g}", fontsize=8)
        if item.get("patch") is None:   # the layer's receptive field is unknown: no box, never a guessed one
            axes[1, k].text(0.5, 0.5, "no patch:\nreceptive field\nunknown", ha="center", va="center", fontsize=8,
                            transform=axes[1, k].transAxes)
            continue
        y0, x0, y1, x1 = item["patch"]
        height, width = img.shape[:2]
        axes[0, k].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=1.5))
        # clipped at the top/left border: the missing rows/columns are the ones before the patch
        oy = win_h - (y1 - y0) if y0 == 0 and y1 - y0 < win_h and y1 < height else 0
        ox = win_w - (x1 - x0) if x0 == 0 and x1 - x0 < win_w and x1 < width else 0
        ax = axes[1, k]
        ax.imshow(img[y0:y1, x0:x1], interpolation="nearest",
                  extent=(ox - 0.5, ox + x1 - x0 - 0.5, oy + y1 - y0 - 0.5, oy - 0.5))
        ax.add_patch(Rectangle((-0.5, -0.5), win_w, win_h, fill=False, edgecolor="0.6", lw=0.8, ls=":"))
        ax.set_xlim(-0.5, win_w - 0.5)
        ax.set_ylim(win_h - 0.5, -0.5)
        clipped = (y1 - y0, x1 - x0) != (win_h, win_w)
        ax.set_title(f"patch {y1 - y0}x{x1 - x0}" + (" (clipped)" if clipped else ""), fontsize=8)
    # the whole top-K's flag when the entry has it (``all_top_negative``), else the shown images'
    negative = entry.get("all_top_negative", bool(top) and all(t["response"] < 0 for t in top))
    of = f" of {total}" if total and total > len(top) else ""
    head = f"{entry['layer']} filter {entry['filter']}: top {len(top)}{of} images and max-response patches"
    if negative:
        head += "\nwarning: every top response is negative (the map sums below 0 even on the filter's best images)"
    fig.suptitle(f"{title}: {head}" if title else head, color="tab:red" if negative else "black")
    if top and not known:
        note = ("response r = spatial sum of the filter's pre-ReLU map; no box is drawn: "
                + entry.get("patch_unknown", f"the receptive field of {entry['layer']} is unknown"))
    else:
        note = ("response r = spatial sum of the filter's pre-ReLU map; the red box is the receptive field of the "
                f"map's largest value (argmax), patches drawn at one scale in a {win_h}x{win_w} window")
    add_caption(fig, f"{note}\n{caption}" if caption else note)
    return fig
