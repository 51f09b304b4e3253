"""``cifarbench occlude``: occlusion maps for image files or a dataset slice, as NPY, CSV, PNG and JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..options import BackendOpt, DataDirOpt, DeviceOpt, JsonOpt, ModelOpt, OutOpt

#: images per engine call when sweeping a dataset slice
DATA_BATCH = 8


def parse_indices(text: str, size: int) -> list[int]:
    """``A:B`` (a slice, either end optional), ``I`` or ``I,J,...`` -> indices into a split of ``size`` images."""
    from ..errors import UserError

    try:
        if ":" in text:
            a, b = text.split(":", 1)
            idx = list(range(*slice(int(a) if a else None, int(b) if b else None).indices(size)))
        else:
            idx = [int(t) for t in text.split(",")]
    except ValueError:
        raise UserError(f"--indices {text!r}: expected A:B, I or I,J,...") from None
    bad = [i for i in idx if not 0 <= i < size]
    if bad or not idx:
        raise UserError(f"--indices {text!r}: out of range for {size} images" if bad else
                        f"--indices {text!r} selects no images")
    return idx


def register(app: typer.Typer) -> None:
    @app.command("occlude")
    def occlude(
        images: Annotated[Optional[list[Path]], typer.Argument(help="32x32 RGB image files.", show_default=False)]
        = None,
        k: Annotated[list[int], typer.Option("--k", "-k", help="Patch size; repeat for several (--k 4 --k 8).")]
        = [8],  # noqa: B006 (typer needs a literal default)
        stride: Annotated[int, typer.Option(help="Step between patch positions, in pixels.")] = 1,
        baseline: Annotated[str, typer.Option(help="Patch colour: gray (0.5), zero, mean (image's channel "
                                                   "means) or a value in [0, 1].")] = "gray",
        label: Annotated[Optional[str], typer.Option(help="Target class (name or 0-9); default: the clean "
                                                          "prediction.")] = None,
        model: ModelOpt = "net1",
        backend: BackendOpt = "auto",
        mode: Annotated[str, typer.Option(help="dense | incremental | auto (the faster one here); incremental "
                                          "runs on torch (exact fp32) or onnx-int8's int8 convs.")] = "auto",
        device: DeviceOpt = None,
        resize: Annotated[bool, typer.Option(help="Scale images that are not 32x32.")] = False,
        data: Annotated[Optional[str], typer.Option(
            "--data", help="Occlude test images of a dataset instead (cifar10, synthetic or PATH).")] = None,
        indices: Annotated[str, typer.Option(help="With --data: A:B, I or I,J,...")] = "0:256",
        data_dir: DataDirOpt = None,
        calib_data: Annotated[Optional[str], typer.Option(
            "--calib-data", help="With --backend onnx-int8 on a torch net: INT8 calibration images (as --data; "
                                 "default $CIFARBENCH_CALIB_DATA or cifar10).")] = None,
        out: OutOpt = None,
        figures: Annotated[bool, typer.Option(help="Write a PNG per image.")] = True,
        json: JsonOpt = False,
    ) -> None:
        """Occlusion maps: slide a KxK patch over each image and record the target class probability.

        Writes per image and K a map (.npy, .csv) and per image one figure with every K to --out (default
        ./occlusion); --json prints {"results": [...]} on stdout.
        """
        from ..errors import UserError

        if not images and data is None:
            raise UserError("give image files or --data SOURCE")
        if images and data is not None:
            raise UserError("give image files or --data, not both")
        from ..analysis.occlusion import check_window, resolve_target

        for kk in k:
            check_window(kk, stride)
        target = resolve_target(label)
        _run(images, data, indices, data_dir, sorted(set(k)), stride, baseline, target, model, backend, mode,
             device, resize, out or Path("occlusion"), figures, json, calib_data)


def _load(images, data, indices, data_dir, resize):
    """(name, image tensor, label or None) for every image to occlude."""
    import torch

    from ..analysis.occlusion import load_image

    if data is None:
        return [(str(p), load_image(p, resize)[0], None) for p in images]
    from ..data import load_split

    ds = load_split(data, "test", data_dir)
    idx = parse_indices(indices, len(ds))
    sub = ds.subset(torch.tensor(idx))
    imgs = sub.float_images()
    return [(f"{Path(data).name.split('.')[0]}-test-{i:05d}", imgs[j], int(sub.labels[j])) for j, i in enumerate(idx)]


def _run(images, data, indices, data_dir, ks, stride, baseline, target, model, backend, mode, device, resize,
         out, figures, json, calib_data) -> None:
    import numpy as np
    import torch

    from ..analysis.occlusion import make_engine, occlusion_maps
    from ..console import console, emit_json, progress
    from ..data import CLASSES
    from ..io import atomic_path, write_text

    items = _load(images, data, indices, data_dir, resize)
    cache: dict = {}
    results: dict[str, list] = {name: [] for name, _, _ in items}
    with progress() as bar:
        task = bar.add_task("occlusion", total=len(items) * len(ks), status="")
        for kk in ks:
            engine = make_engine(model, kk, stride, backend, mode, device, cache=cache,
                                 **({"calib_data": calib_data} if calib_data else {}))
            bar.update(task, status=f"K={kk} {engine.mode}")
            for i in range(0, len(items), DATA_BATCH):
                chunk = items[i:i + DATA_BATCH]
                batch = torch.stack([img for _, img, _ in chunk])
                for (name, _, _), r in zip(chunk, occlusion_maps(engine, batch, kk, stride=stride,
                                                                 baseline=baseline, targets=target,
                                                                 names=[n for n, _, _ in chunk])):
                    results[name].append(r)
                bar.advance(task, len(chunk))
    for name, img, true_label in items:
        for r in results[name]:
            stem = out / f"{Path(name).stem}_k{r.k}"
            with atomic_path(stem.with_suffix(".npy")) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, r.map)
            write_text(stem.with_suffix(".csv"), "\n".join(",".join(f"{v:.6g}" for v in row) for row in r.map) + "\n")
        if figures:
            from ..analysis.occlusion_plot import plot_occlusion

            title = Path(name).name + (f" (label {CLASSES[true_label]})" if true_label is not None else "")
            plot_occlusion(img, results[name], out / f"{Path(name).stem}.png", title)
    flat = [r for name, _, _ in items for r in results[name]]
    if json:
        emit_json({"results": [r.to_dict() for r in flat]})
        return
    from rich.table import Table

    table = Table(title=f"occlusion maps ({flat[0].engine['mode']} on {flat[0].engine['device']}) -> {out}")
    for col in ("image", "K", "target", "clean p", "map sum", "most damaging (y, x)", "p there"):
        table.add_column(col)
    for r in flat:
        worst = r.most_damaging
        table.add_row(Path(r.image).stem if r.image else "", str(r.k), CLASSES[r.target], f"{r.clean_prob:.3f}",
                      f"{r.map_sum:.2f}", f"({worst['y']}, {worst['x']})", f"{worst['prob']:.3f}")
    console.print(table)
