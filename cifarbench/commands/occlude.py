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

        Writes per image and K a map (<stem>_k<K>.npy, .csv) and per image one figure with every K
        (<stem>_occlusion.png) to --out (default ./occlusion); an image given twice is occluded once, two images
        with one stem get <stem>, <stem>-2, ... Never replaces a file cifarbench did not write. --json prints
        {"results": [...]} on stdout, each with the files it wrote.
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


def _identity(path: Path):
    """What makes two image arguments the same file: device and inode (the same file by another path, a link or
    a hard link), else the resolved path (a missing file, reported by the loader)."""
    try:
        st = path.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(path.resolve()))


def output_names(inputs: list[Path], out: Path, ks: list[int], figures: bool) -> list[str]:
    """A distinct base name per input image for its outputs ``<base>_k<K>.npy/.csv`` and ``<base>_occlusion.png``.

    The base is the image's stem; a stem that two inputs share (``a/x.png``, ``b/x.png``, or ``X.png`` and
    ``x.png``, one file on a case-insensitive disk) gets ``-2``, ``-3`` ... on its later inputs, and a base whose
    outputs would land on any input image (``x.png`` with ``x_occlusion.png``) is bumped too, so no output can
    replace an input."""
    inputs_at = {str(p.resolve()) for p in inputs} | {str(p.absolute()) for p in inputs}
    inodes = {_identity(p) for p in inputs}

    def lands_on_input(base: str) -> bool:
        for name in files_for(base, ks, figures):
            target = out / name
            if str(target.resolve()) in inputs_at or str(target.absolute()) in inputs_at:
                return True
            if target.exists() and _identity(target) in inodes:
                return True
        return False

    taken: set[str] = set()
    bases = []
    for p in inputs:
        stem, n = p.stem, 1
        base = stem
        while base.casefold() in taken or lands_on_input(base):
            n += 1
            base = f"{stem}-{n}"
        taken.add(base.casefold())
        bases.append(base)
    return bases


def files_for(base: str, ks: list[int], figures: bool) -> list[str]:
    return [f"{base}_k{k}.{ext}" for k in ks for ext in ("npy", "csv")] + ([f"{base}_occlusion.png"] if figures else [])


def _distinct_images(images: list[Path]) -> list[Path]:
    """The image arguments with repeats of one file (by any path) dropped: one result per distinct image."""
    seen, kept = set(), []
    for p in images:
        key = _identity(Path(p))
        if key not in seen:
            seen.add(key)
            kept.append(Path(p))
    return kept


def _load(images, data, indices, data_dir, resize):
    """(name, image tensor, label or None) for every distinct image to occlude."""
    import torch

    from ..analysis.occlusion import load_image

    if data is None:
        return [(str(p), load_image(p, resize)[0], None) for p in images]
    from ..data import load_split

    ds = load_split(data, "test", data_dir)
    idx = list(dict.fromkeys(parse_indices(indices, len(ds))))  # "3,3" is one image, once
    sub = ds.subset(torch.tensor(idx))
    imgs = sub.float_images()
    return [(f"{Path(data).name.split('.')[0]}-test-{i:05d}", imgs[j], int(sub.labels[j])) for j, i in enumerate(idx)]


def _run(images, data, indices, data_dir, ks, stride, baseline, target, model, backend, mode, device, resize,
         out, figures, json, calib_data) -> None:
    from ..io import output_folder

    if images:
        images = _distinct_images(images)
        bases = output_names(images, out, ks, figures)
    # --out is checked (a writable folder, no file of the user's under an output name) before any image is read
    # or any model built; for --data the names are known only once the dataset is open, and each write checks
    with output_folder(out, [n for b in bases for n in files_for(b, ks, figures)] if images else ()):
        _occlude(images, data, indices, data_dir, ks, stride, baseline, target, model, backend, mode, device,
                 resize, out, figures, json, calib_data, bases if images else None)


def _occlude(images, data, indices, data_dir, ks, stride, baseline, target, model, backend, mode, device, resize,
             out, figures, json, calib_data, bases) -> None:
    import numpy as np
    import torch

    from ..analysis.occlusion import make_engine, occlusion_maps
    from ..console import console, emit_json, progress
    from ..data import CLASSES
    from ..io import atomic_path, check_outputs, write_text

    items = _load(images, data, indices, data_dir, resize)
    if bases is None:
        bases = [name for name, _, _ in items]  # dataset names are distinct and hold no path
        check_outputs(out / n for b in bases for n in files_for(b, ks, figures))  # before the maps are computed
    cache: dict = {}
    results: dict[str, list] = {b: [] for b in bases}
    with progress() as bar:
        task = bar.add_task("occlusion", total=len(items) * len(ks), status="")
        for kk in ks:
            engine = make_engine(model, kk, stride, backend, mode, device, cache=cache,
                                 **({"calib_data": calib_data} if calib_data else {}))
            bar.update(task, status=f"K={kk} {engine.mode}")
            for i in range(0, len(items), DATA_BATCH):
                chunk = items[i:i + DATA_BATCH]
                batch = torch.stack([img for _, img, _ in chunk])
                for base, r in zip(bases[i:i + DATA_BATCH], occlusion_maps(
                        engine, batch, kk, stride=stride, baseline=baseline, targets=target,
                        names=[n for n, _, _ in chunk])):
                    results[base].append(r)
                bar.advance(task, len(chunk))
    files: dict[int, list[str]] = {}
    for base, (name, img, true_label) in zip(bases, items):
        for r in results[base]:
            stem = out / f"{base}_k{r.k}"
            with atomic_path(stem.with_suffix(".npy")) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, r.map)
            write_text(stem.with_suffix(".csv"), "\n".join(",".join(f"{v:.6g}" for v in row) for row in r.map) + "\n")
            files[id(r)] = [str(stem.with_suffix(".npy")), str(stem.with_suffix(".csv"))]
        if figures:
            from ..analysis.occlusion_plot import plot_occlusion

            title = Path(name).name + (f" (label {CLASSES[true_label]})" if true_label is not None else "")
            figure = out / f"{base}_occlusion.png"
            plot_occlusion(img, results[base], figure, title)
            for r in results[base]:
                files[id(r)].append(str(figure))
    flat = [(base, r) for base in bases for r in results[base]]
    if json:
        emit_json({"results": [{**r.to_dict(), "files": files[id(r)]} for _, r in flat]})
        return
    from rich.table import Table

    first = flat[0][1]
    table = Table(title=f"occlusion maps ({first.engine['mode']} on {first.engine['device']}) -> {out}")
    for col in ("image", "files", "K", "target", "clean p", "map sum", "most damaging (y, x)", "p there"):
        table.add_column(col)
    for base, r in flat:
        worst = r.most_damaging
        table.add_row(Path(r.image).stem if r.image else "", f"{base}_k{r.k}.*", str(r.k), CLASSES[r.target],
                      f"{r.clean_prob:.3f}",
                      f"{r.map_sum:.2f}", f"({worst['y']}, {worst['x']})", f"{worst['prob']:.3f}")
    console.print(table)
