"""``cifarbench occlude``: occlusion maps for image files or a dataset slice, as NPY, CSV, PNG and JSON."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..figure_worker import Draw
from ..options import (ArchKwOpt, ArchOpt, BackendOpt, ClassesOpt, DataDirOpt, DeviceOpt, InputSizeOpt,
                       JsonOpt, MeanOpt, ModelOpt, OutOpt, StdOpt)

#: images per engine call when sweeping a dataset slice
DATA_BATCH = 8
#: at most this many images in grid.png (a 256-image slice would make a poster)
GRID_MAX = 48
#: files every run writes into --out besides the per-image ones
INDEX = "index.html"


DEFAULT_IMAGES = 256  # --data without --indices: the first this many test images (fewer if the split is smaller)
_WHOLE = re.compile(r"[0-9]+")  # ASCII digits only: int() would also take "1_0" and other scripts' digits


def parse_indices(text: str | None):
    """The syntax of ``--indices``, checked before any data is opened: ``A:B`` (either end optional) as
    ``("slice", A, B)``, ``I`` or ``I,J,...`` as ``("list", [I, J, ...])``, None (not given) as ``("default",)``."""
    from ..errors import UserError

    if text is None:
        return ("default",)
    parts = text.split(":")
    if len(parts) == 2 and all(not p.strip() or _WHOLE.fullmatch(p.strip()) for p in parts):
        a, b = (int(p) if p.strip() else None for p in parts)
        return ("slice", a, b)
    items = [t.strip() for t in text.split(",")]
    if len(parts) == 1 and items and all(_WHOLE.fullmatch(t) for t in items):
        return ("list", [int(t) for t in items])
    if any(t.strip().startswith("-") for t in re.split("[:,]", text)):
        # Python would read -2 as size - 2: an index the user did not write
        raise UserError(f"--indices {text!r}: indices start at 0 and count up (A:B, I or I,J,...)")
    raise UserError(f"--indices {text!r}: expected A:B, I or I,J,... with whole numbers")


def select_indices(spec, text: str | None, size: int) -> tuple[list[int], str]:
    """The indices ``spec`` (from :func:`parse_indices`) selects in a split of ``size`` images, each once, and
    the ``A:B`` / list text that the results record."""
    from ..errors import UserError

    if spec[0] == "default":
        end = min(DEFAULT_IMAGES, size)
        if end == 0:
            raise UserError("the split has no images")
        return list(range(end)), f"0:{end}"
    if spec[0] == "slice":
        a, b = spec[1], spec[2]
        if b is not None and b > size:  # a slice would be cut to the split silently, and the JSON record A:B
            raise UserError(f"--indices {text!r}: the split has {size} images (0 to {size - 1}); give an end of "
                            f"at most {size}")
        idx = list(range(a or 0, size if b is None else b))
    else:
        idx = list(dict.fromkeys(spec[1]))  # "3,3" is one image, once
    bad = [i for i in idx if not 0 <= i < size]
    if bad or not idx:
        raise UserError(f"--indices {text!r}: out of range for {size} images (0 to {size - 1})" if bad else
                        f"--indices {text!r} selects no images")
    return idx, text


def register(app: typer.Typer) -> None:
    @app.command("occlude")
    def occlude(
        images: Annotated[Optional[list[Path]], typer.Argument(
            help="RGB image files of the model's input size (32x32 for CIFAR).", show_default=False)] = None,
        k: Annotated[list[int], typer.Option("--k", "-k", help="Patch size; repeat for several (--k 4 --k 8).")]
        = [8],  # noqa: B006 (typer needs a literal default)
        stride: Annotated[int, typer.Option(help="Step between patch positions, in pixels.")] = 1,
        baseline: Annotated[str, typer.Option(help="Patch colour: gray (0.5), zero, mean (image's channel "
                                                   "means) or a value in [0, 1].")] = "gray",
        label: Annotated[Optional[str], typer.Option(help="Target class (a name of the model's classes, or its "
                                                          "index); default: the clean prediction.")] = None,
        model: ModelOpt = "net1",
        arch: ArchOpt = None,
        arch_kw: ArchKwOpt = None,
        mean: MeanOpt = None,
        std: StdOpt = None,
        classes: ClassesOpt = None,
        input_size: InputSizeOpt = None,
        backend: BackendOpt = "auto",
        mode: Annotated[str, typer.Option(help="dense | incremental | auto (the faster exact one here) | approx; "
                                          "incremental runs on any torch model or fp32 ONNX file the "
                                          "layer-graph IR represents (exact fp32) or on onnx-int8's int8 convs; "
                                          "approx (the same models) computes a coarse grid exactly, refines "
                                          "where the map "
                                          "varies by >= --tau and interpolates the rest, windows in bf16 on "
                                          "AMX CPUs: never the default.")] = "auto",
        tau: Annotated[Optional[float], typer.Option(
            help="With --mode approx: the probability spread below which a region is interpolated (default 0.1; "
                 "0 with --coarse 1 computes every position; larger is faster and less exact).")] = None,
        coarse: Annotated[Optional[int], typer.Option(
            help="With --mode approx: the first exact grid's step in map positions, 1-16 (default 2; 4 is a "
                 "little faster and misses more narrow features).")] = None,
        approx_precision: Annotated[Optional[str], typer.Option(
            "--approx-precision", help="With --mode approx: the recomputed windows' precision, fp32 or bf16 "
                                       "(default: bf16 on CPUs with AMX tiles, else fp32). fp32 with --tau 0 "
                                       "--coarse 1 is the exact map.", show_default=False)] = None,
        device: DeviceOpt = None,
        resize: Annotated[bool, typer.Option(help="Scale images that are not the model's input size.")] = False,
        data: Annotated[Optional[str], typer.Option(
            "--data", help="Occlude test images of a dataset instead (cifar10, synthetic or PATH).")] = None,
        indices: Annotated[Optional[str], typer.Option(
            help=f"With --data: A:B, I or I,J,... (default: the first {DEFAULT_IMAGES} test images, or all of a "
                 "smaller split).", show_default=False)] = None,
        data_dir: DataDirOpt = None,
        calib_data: Annotated[Optional[str], typer.Option(
            "--calib-data", help="With --backend onnx-int8 on a torch net: INT8 calibration images (as --data; "
                                 "default $CIFARBENCH_CALIB_DATA or cifar10).")] = None,
        out: OutOpt = None,
        figures: Annotated[bool, typer.Option(help="Write a PNG per image (and grid.png for --data).")] = True,
        show: Annotated[str, typer.Option(help="What the figures colour: prob (p(target)) or drop (clean p "
                                               "minus occluded p).")] = "prob",
        independent_scale: Annotated[bool, typer.Option(
            "--independent-scale", help="One colour scale per K in a figure (default: one shared scale).")] = False,
        executor: Annotated[str, typer.Option(
            "--executor", help="With --data: local (shards here, one after another) or ray (shards as Ray "
                               "tasks).")] = "local",
        address: Annotated[Optional[str], typer.Option(
            "--address", help="Ray cluster (HOST:PORT, ray://HOST:PORT or auto); default: start a local Ray.")]
        = None,
        cpus_per_task: Annotated[float, typer.Option("--cpus-per-task", help="CPUs per Ray task.")] = 1.0,
        gpus_per_task: Annotated[float, typer.Option("--gpus-per-task", help="GPUs per Ray task.")] = 0.0,
        ray_cpus: Annotated[Optional[int], typer.Option(
            "--ray-cpus", help="CPUs of the local Ray started without --address (default: all).")] = None,
        resume: Annotated[bool, typer.Option(
            "--resume", help="With --data: reuse the shards already finished in --out/shards.")] = False,
        json: JsonOpt = False,
    ) -> None:
        """Occlusion maps: slide a KxK patch over each image and record the target class probability.

        Writes per image and K a map (<stem>_k<K>.npy, .csv) and per image one figure with every K
        (<stem>_occlusion.png) to --out (default ./occlusion), with index.html (figures, table, provenance); for
        --data also grid.png and the finished shards (shards/, for --resume). An image given twice is occluded
        once, two images with one stem get <stem>, <stem>-2, ... Never replaces a file cifarbench did not write.
        --json prints {"provenance": ..., "results": [...]} on stdout, each result with the files it wrote and
        its engine (which ran and why).

        Examples: cifarbench occlude --k 8 examples/cat.png;
        cifarbench occlude --model resnet.pt --arch mymodels:resnet20 --data cifar10 --indices 0:100 --k 8
        """
        from ..errors import UserError

        if not images and data is None:
            raise UserError("give image files or --data SOURCE")
        if images and data is not None:
            raise UserError("give image files or --data, not both")
        if show not in ("prob", "drop"):
            raise UserError(f"--show must be prob or drop, got {show!r}")
        from ..figure_worker import figure_worker

        # forked before torch is imported, so matplotlib loads in the worker meanwhile (see figure_worker)
        with figure_worker(enabled=figures) as draw:
            import torch

            from ..analysis.occlusion import MODES, baseline_values

            if mode not in MODES:
                raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
            if any(int(kk) < 1 for kk in k):
                raise UserError(f"K must be at least 1, got {min(k)}")
            if stride < 1:
                raise UserError(f"stride must be at least 1, got {stride}")

            from ..runtime import BACKENDS

            if backend not in BACKENDS:
                raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
            baseline_values(baseline, torch.zeros(1, 3, 1, 1))  # its one check, before the model is opened
            if data is None and (executor != "local" or resume or address):
                raise UserError("--executor, --address and --resume shard a --data run; image files run here "
                                "(give --data DATA --indices A:B)")
            if data is None and indices is not None:
                raise UserError("--indices selects test images of --data; give --data DATA or leave it out")
            indices = (parse_indices(indices), indices)  # its syntax now, before a model or data is opened
            if data is not None:
                from ..distributed import check_executor

                check_executor(executor, address, cpus_per_task, gpus_per_task)
            if (tau is not None or coarse is not None or approx_precision is not None) and mode != "approx":
                raise UserError("--tau, --coarse and --approx-precision are knobs of --mode approx")
            if approx_precision is not None and approx_precision not in ("fp32", "bf16"):
                raise UserError(f"--approx-precision takes fp32 or bf16, got {approx_precision!r}")
            settings = Settings(sorted(set(k)), stride, baseline, label, backend, mode, device, resize, calib_data,
                                figures, show, not independent_scale, json,
                                Sharding(executor, address, cpus_per_task, gpus_per_task, ray_cpus, resume),
                                {"arch": arch, "arch_kw": arch_kw, "mean": mean, "std": std, "classes": classes,
                                 "input_size": input_size})
            settings.approx = {"tau": tau, "coarse": coarse, "approx_precision": approx_precision} \
                if mode == "approx" else {}
            settings.draw = draw
            _run(images, data, indices, data_dir, model, out or Path("occlusion"), settings)


class Sharding:
    def __init__(self, executor, address, cpus_per_task, gpus_per_task, ray_cpus, resume):
        self.executor, self.address, self.resume = executor, address, resume
        self.cpus_per_task, self.gpus_per_task, self.ray_cpus = cpus_per_task, gpus_per_task, ray_cpus


class Settings:
    """The command's options after parsing (one object instead of twenty arguments)."""

    def __init__(self, ks, stride, baseline, label, backend, mode, device, resize, calib_data, figures, show,
                 shared_scale, json, sharding, contract):
        self.ks, self.stride, self.baseline, self.label = ks, stride, baseline, label
        self.backend, self.mode, self.device, self.resize = backend, mode, device, resize
        self.calib_data, self.figures, self.show, self.shared_scale = calib_data, figures, show, shared_scale
        self.json, self.sharding, self.contract = json, sharding, contract


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


def grid_names(ks: list[int]) -> list[str]:
    return ["grid.png"] if len(ks) == 1 else [f"grid_k{k}.png" for k in ks]


def _load(images, data, indices, data_dir, resize, source):
    """(name, image tensor, label or None) for every distinct image to occlude, and (the selected images as a
    dataset, the whole split, the --indices text recorded) for --data, else Nones."""
    import torch

    from ..analysis.occlusion import load_image

    if data is None:
        return [(str(p), load_image(p, resize, source.input_size)[0], None) for p in images], (None, None, None)
    from ..options import load_test_split

    ds = load_test_split(source, data, data_dir)
    idx, recorded = select_indices(*indices, len(ds))
    sub = ds.subset(torch.tensor(idx))
    imgs = sub.float_images()
    stem = _data_stem(data)
    items = [(f"{stem}-test-{i:05d}", imgs[j], int(sub.labels[j])) for j, i in enumerate(idx)]
    return items, (sub, ds, recorded)


def _data_stem(data: str) -> str:
    """The name --data results are called by: the folder or archive's own name (``--data .`` included), a
    source's name without its ``:N``."""
    path = Path(data)
    name = path.resolve().name if path.exists() else data.split(":")[0]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
    return re.sub(r"[^\w.-]+", "_", name).strip("._-") or "data"


def _run(images, data, indices, data_dir, model, out, st: Settings) -> None:
    from ..io import output_folder

    if images:
        images = _distinct_images(images)
        bases = output_names(images, out, st.ks, st.figures)
    names = [n for b in bases for n in files_for(b, st.ks, st.figures)] + [INDEX] if images else [INDEX]
    # --out is checked (a writable folder, no file of the user's under an output name) before any image is read
    # or any model built; for --data the names are known only once the dataset is open, and each write checks
    with output_folder(out, names, subdirs=("shards",)):
        try:
            _occlude(images, data, indices, data_dir, model, out, st, bases if images else None)
        except BaseException:
            draw = getattr(st, "draw", None)
            if draw is not None:
                draw.close(abort=True)  # the worker stops writing before the output folder is closed
            raise


def _occlude(images, data, indices, data_dir, model, out, st: Settings, bases) -> None:
    import time

    import numpy as np

    from ..analysis.occlusion import check_window, resolve_target
    from ..console import console, emit_json
    from ..io import atomic_path, check_outputs, write_text
    from ..options import model_source
    from ..provenance import caption
    from .publish import command_provenance

    source = model_source(model, **st.contract)  # resolved once: everything below takes the source
    for kk in st.ks:
        check_window(kk, st.stride, source.input_size)
    target = resolve_target(st.label, source.classes)
    items, (dataset, split, recorded) = _load(images, data, indices, data_dir, st.resize, source)
    if bases is None:
        bases = [name for name, _, _ in items]  # dataset names are distinct and hold no path
        grids = grid_names(st.ks) if st.figures else []
        check_outputs([out / n for b in bases for n in files_for(b, st.ks, st.figures)] +
                      [out / g for g in grids])  # before the maps are computed
    options = {"calib_data": st.calib_data} if st.calib_data else {}
    options.update(getattr(st, "approx", {}))
    started = time.perf_counter()
    if dataset is not None:
        results, engine_info = _dataset_maps(source, dataset, items, target, st, out, options)
    else:
        results, engine_info = _image_maps(source, items, bases, target, st, options)
    seconds = time.perf_counter() - started
    maps_per_s = len(items) * len(st.ks) / seconds if seconds > 0 else None
    classes = tuple(source.classes)
    for base in bases:
        for r in results[base]:
            r.classes = classes
    prov = command_provenance(model=source, data=split, backend=engine_info.get("backend"),
                              precision=engine_info.get("precision"), device=engine_info.get("device"),
                              extra={"k": st.ks, "stride": st.stride, "mode": st.mode,
                                     "engine": engine_info.get("engine"), "engine_why": engine_info.get("why"),
                                     **({"approx": {key: engine_info.get(key) for key in
                                                    ("tau", "coarse", "precision")}} if st.mode == "approx" else {}),
                                     "baseline": st.baseline,
                                     **({"indices": recorded, "images": len(items)} if dataset is not None else {})})
    cap = caption(prov, f"{st.baseline} patches" if st.baseline != "gray" else None)
    files: dict[int, list[str]] = {}
    figures = []
    draw = getattr(st, "draw", None) or Draw()  # the figure worker when the command forked one, else in-process
    for base, (name, img, true_label) in zip(bases, items):
        for r in results[base]:
            # the names files_for checked; not Path.with_suffix, which would cut "my.cat_k8" to "my"
            npy, csv = (out / name for name in files_for(base, [r.k], False))
            with atomic_path(npy) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, r.map)
            # 9 significant digits: a float32 map reads back from the CSV exactly
            write_text(csv, "\n".join(",".join(f"{v:.9g}" for v in row) for row in r.map) + "\n")
            files[id(r)] = [str(npy), str(csv)]
        if st.figures:
            from ..analysis.occlusion_plot import plot_occlusion

            figure = out / f"{base}_occlusion.png"
            draw(plot_occlusion, _pixels(img), results[base], figure, Path(name).name, model=source.name,
                 true_label=classes[true_label] if true_label is not None else None, classes=classes,
                 show=st.show, shared_scale=st.shared_scale, caption=cap)
            figures.append({"path": figure.name, "caption": f"{Path(name).name}: {cap}"})
            for r in results[base]:
                files[id(r)].append(str(figure))
    grid_files = []
    if st.figures and dataset is not None:
        from ..analysis.occlusion_plot import plot_occlusion_grid

        shown = list(zip(bases, items))[:GRID_MAX]
        more = f" (the first {GRID_MAX} of {len(items)} images)" if len(items) > GRID_MAX else ""
        for kk, gname in zip(st.ks, grid_names(st.ks)):
            tiles = [(_pixels(img), next(r for r in results[b] if r.k == kk),
                      classes[lab] if lab is not None else None, name) for b, (name, img, lab) in shown]
            draw(plot_occlusion_grid, tiles, out / gname, model=source.name, classes=classes, show=st.show,
                 caption=cap + more)
            grid_files.append(str(out / gname))
            figures.insert(len(grid_files) - 1, {"path": gname, "caption": f"K={kk}{more}: {cap}"})
    flat = [(base, r) for base in bases for r in results[base]]
    doc = {"provenance": prov, "engine": engine_info, "images": len(items), "seconds": seconds,
           "maps_per_s": maps_per_s,
           "results": [{**r.to_dict(), "true": classes[t] if t is not None else None, "files": files[id(r)]}
                       for (base, r), t in zip(flat, [lab for (_, _, lab) in items for _ in st.ks])]}
    if grid_files:
        doc["grid"] = grid_files
    rows = _table_rows(flat, items, st, classes)
    draw.wait()  # every figure on disk (or its error raised) before the page that shows them
    from ..report_html import write_index

    write_index(out, f"Occlusion maps of {source.name}", prov,
                [{"title": "Maps", "text": f"engine: {_engine_label(engine_info)} ({engine_info.get('why')}); "
                                           f"{len(items) * len(st.ks)} maps in {seconds:.2f} s",
                  "figures": figures, "table": {"columns": list(rows[0]), "rows": [list(r.values()) for r in rows]}}],
                result=doc)
    if st.json:
        emit_json(doc)
        return
    from rich.table import Table

    speed = f", {maps_per_s:.2f} maps/s" if dataset is not None and maps_per_s else ""
    table = Table(title=f"occlusion maps of {source.name} ({_engine_label(engine_info)} on "
                        f"{engine_info.get('device')}{speed}) -> {out}")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(v if isinstance(v, str) else f"{v:.3f}" if isinstance(v, float) else str(v)
                        for v in row.values()))
    console.print(table)


def _pixels(img):
    """An image as numpy for a figure job: what travels to the figure worker must not need torch to unpickle."""
    return img.cpu().numpy() if hasattr(img, "cpu") else img


def _engine_label(info: dict) -> str:
    """The engine as the summary names it: for approx with its knobs and how many positions were exact."""
    label = str(info.get("engine"))
    if info.get("mode") == "approx":
        label += f" (tau {info.get('tau'):g}, coarse {info.get('coarse')}, {info.get('precision')} windows"
        if info.get("positions"):
            # computed (in the windows' precision) as opposed to interpolated: exact only in fp32
            label += f", {info['exact_positions']} of {info['positions']} positions computed"
        label += ")"
    return label


def _table_rows(flat, items, st: Settings, classes) -> list[dict]:
    """The terminal table's rows (also index.html's): the prediction, the target when it is not the prediction
    (--label), the true label when known."""
    labels = {}
    for (name, _, lab) in items:
        labels[name] = lab
    known = any(lab is not None for (_, _, lab) in items)
    rows = []
    for base, r in flat:
        worst = r.most_damaging
        row = {"image": Path(r.image).stem if r.image else base, "files": f"{base}_k{r.k}.*", "K": r.k,
               "predicted": classes[r.predicted]}
        if st.label is not None:
            row["target"] = classes[r.target]
        if known:
            lab = labels.get(r.image)
            row["true"] = classes[lab] if lab is not None else ""
        row.update({"clean p": r.clean_prob, "map sum": r.map_sum, "most damaging (y, x)": f"({worst['y']}, "
                    f"{worst['x']})", "p there": worst["prob"]})
        rows.append(row)
    return rows


def _image_maps(source, items, bases, target, st: Settings, options):
    """Maps of image files, in this process: per K one engine (reused across K where it can be)."""
    import torch

    from ..analysis.occlusion import add_exact_counts, make_engine, occlusion_maps
    from ..console import progress

    cache: dict = {}
    results: dict[str, list] = {b: [] for b in bases}
    info = {}
    counts: dict = {}
    with progress() as bar:
        task = bar.add_task("occlusion", total=len(items) * len(st.ks), status="")
        for kk in st.ks:
            engine = make_engine(source, kk, st.stride, st.backend, st.mode, st.device, cache=cache, **options)
            info = engine.describe()
            bar.update(task, status=f"K={kk} {engine.mode}")
            for i in range(0, len(items), DATA_BATCH):
                chunk = items[i:i + DATA_BATCH]
                batch = torch.stack([img for _, img, _ in chunk])
                maps = occlusion_maps(engine, batch, kk, stride=st.stride, baseline=st.baseline, targets=target,
                                      names=[n for n, _, _ in chunk])
                add_exact_counts(counts, maps)  # approx: over every map of the run
                for base, r in zip(bases[i:i + DATA_BATCH], maps):
                    results[base].append(r)
                bar.advance(task, len(chunk))
    info.update(counts)
    return results, info


def _dataset_maps(source, dataset, items, target, st: Settings, out, options):
    """Maps of a dataset slice in shards (cifarbench.distributed): here or on Ray, resumable from --out/shards."""
    from ..console import progress
    from ..distributed import run_sharded

    sh = st.sharding
    knobs = dict(getattr(st, "approx", {}))  # approx: tau and coarse (None: the defaults, resolved by run_sharded)
    names = [name for name, _, _ in items]
    contract = {key: v for key, v in st.contract.items() if v is not None}
    with progress() as bar:
        task = bar.add_task("occlusion shards", total=None, status="")

        def report(p) -> None:
            rate = f"{p.images_per_s:.1f} img/s" if p.images_per_s else ""
            eta = f", ETA {p.eta_s:.0f} s" if p.eta_s is not None else ""
            bar.update(task, total=p.total, completed=p.done, status=f"{p.images_done}/{p.images_total} images "
                                                                     f"{rate}{eta}")

        run = run_sharded("occlusion", source, dataset, executor=sh.executor, address=sh.address,
                          cpus_per_task=sh.cpus_per_task, gpus_per_task=sh.gpus_per_task, ray_cpus=sh.ray_cpus,
                          out=out, resume=sh.resume, progress=report, model_options=contract, names=names,
                          ks=st.ks, stride=st.stride, baseline=st.baseline, target=target, mode=st.mode,
                          backend=st.backend, device=st.device, batch=DATA_BATCH, calib_data=st.calib_data,
                          **knobs)
    results = {name: per for name, per in zip(names, run.result)}
    info = dict(next((r.engine for per in run.result for r in per if r.engine), {}))
    # approx: each result carries its shard's count of exact positions; the run's is their sum, once per shard and K
    counts = {(tuple(r.engine["shard"]), r.k): (r.engine["positions"], r.engine["exact_positions"])
              for per in run.result for r in per if "shard" in r.engine}
    if counts:
        info.pop("shard", None)
        info.update(positions=sum(p for p, _ in counts.values()), exact_positions=sum(e for _, e in counts.values()))
    info = {**info, "executor": sh.executor, "shards": run.shards, "shards_resumed": run.skipped}
    return results, info
