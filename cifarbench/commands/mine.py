"""``cifarbench mine``: the top-K test images of each filter, their max-response patches, and dead filters."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..options import (AddressOpt, ArchKwOpt, ArchOpt, BackendOpt, ClassesOpt, CpusPerTaskOpt, DataDirOpt, DataOpt,
                       DeviceOpt, ExecutorOpt, GpusPerTaskOpt, InputSizeOpt, JsonOpt, MeanOpt, ModelArg, OutOpt,
                       RayCpusOpt, ResumeOpt, StdOpt)
from .ablate import BatchOpt, FiltersOpt, LimitOpt, SpecsArg, _csv, open_analysis, run_progress


def write_mining(result: dict, data, out: Path, show: int) -> list[Path]:
    from ..analysis.figures import mining_figure
    from ..io import write_json, write_text
    from .publish import figure_caption, write_page

    prov = result.get("provenance") or {}
    name = (prov.get("model") or {}).get("name") or "model"

    classes = list(data.classes)
    top_rows = [["layer", "filter", "rank", "index", "label", "response", "y0", "x0", "y1", "x1"]]
    hist_rows = [["layer", "filter", *classes, "max_class"]]
    resp_rows = [["layer", "filter", "mean_top_response", "max_response", "all_top_negative"]]
    paths = []
    for f in result["filters"]:
        for k, t in enumerate(f["top"], 1):
            # an unknown patch (the layer's receptive field is unknown) is four empty cells, never a guess
            top_rows.append([f["layer"], f["filter"], k, t["index"], t["label"], f"{t['response']:.6g}",
                             *(t["patch"] if t["patch"] is not None else ("",) * 4)])
        hist_rows.append([f["layer"], f["filter"], *(f["class_histogram"][c] for c in classes), f["max_class"]])
        resp_rows.append([f["layer"], f["filter"], f"{f['mean_top_response']:.6g}", f"{f['max_response']:.6g}",
                          int(bool(f.get("all_top_negative")))])
        if show < 1:  # --show 0: tables only (a figure takes ~1 s to draw; a net has hundreds of filters)
            continue
        shown = dict(f, top=f["top"][:show])
        images = [data.images[t["index"]].numpy() for t in shown["top"]]
        rf = result["receptive_fields"].get(f["layer"])
        paths.append(mining_figure(
            images, shown, out / figure_name(f["layer"], f["filter"]), receptive_field=rf, title=name,
            total=len(f["top"]), caption=figure_caption(prov)))  # the figure's own note defines r and the box
    tables = {
        "top_images.csv": top_rows, "class_histogram.csv": hist_rows, "responses.csv": resp_rows,
        "receptive_fields.csv": [["layer", "receptive_field"],
                                 *((k, rf_text(v)) for k, v in result["receptive_fields"].items())],
        "dead_filters.csv": [["layer", "filter"], *((d["layer"], d["filter"]) for d in result["dead_filters"])],
    }
    for fname, rows in tables.items():  # not ``name``: that is the model's, for the page's title below
        write_text(out / fname, _csv(rows))
        paths.append(out / fname)
    write_json(out / "mining.json", result)
    # each figure with its caption on the page: the filter it shows and the run's provenance line
    shown = result["filters"] if show >= 1 else []
    figures = [{"path": str(p), "caption": f"{f['layer']} filter {f['filter']}: {figure_caption(prov)}"}
               for p, f in zip((p for p in paths if p.suffix == ".png"), shown)]
    negative = [f"{n['layer']}:{n['filter']}" for n in result.get("negative_filters", ())]
    page = write_page(out, f"mine: {name}, {_count(len(result['filters']), 'filter')}", prov, [
        {"title": "Responses", "text": "Response: the spatial sum of a filter's pre-ReLU map over an image.",
         "table": {"columns": ["layer", "filter", "max class", "mean top response", "max response"],
                   "rows": [[f["layer"], f["filter"], f["max_class"], f["mean_top_response"], f["max_response"]]
                            for f in result["filters"]]}},
        {"title": "Top images per filter", "figures": figures[:200],
         "text": "" if len(figures) <= 200 else f"the first 200 of {len(figures)} figures; all are in filters/"},
        {"title": "Receptive fields", "table": {"columns": ["layer", "receptive field"],
                                                "rows": [[k, rf_text(v)]
                                                         for k, v in result["receptive_fields"].items()]}},
        {"title": "Dead filters", "text": f"{_count(len(result['dead_filters']), 'filter')} whose pre-ReLU map "
                                          f"is <= 0 everywhere on every image"
                                          + (": " + ", ".join(_dead_names(result)[:200]) if result["dead_filters"]
                                             else ".")},
        {"title": "Filters with only negative top responses",
         "text": f"{_count(len(negative), 'filter')} whose largest response is below 0, so their top images are "
                 f"only the least negative ones" + (": " + ", ".join(negative[:200]) if negative else ".")},
    ], result)
    return [*paths, out / "mining.json", page]


def _dead_names(result: dict) -> list[str]:
    """``layer:filter`` of each dead filter, as dead_filters.csv and the terminal name them."""
    return [f"{d['layer']}:{d['filter']}" for d in result["dead_filters"]]


def rf_text(rf) -> str | int:
    """A receptive field as shown: the number (square), ``HxW`` (not square), ``unknown`` (None)."""
    if rf is None:
        return "unknown"
    return "x".join(map(str, rf)) if isinstance(rf, (list, tuple)) else rf


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def show_mining(result: dict, classes) -> None:
    from rich.table import Table

    from ..console import console

    table = Table(title="top-K images per filter: class histogram (Table 2) and responses (Table 3)")
    for col in ("filter", *(c[:5] for c in classes), "max class", "mean top", "max"):
        table.add_column(col)
    for f in result["filters"][:40]:
        table.add_row(f"{f['layer']}:{f['filter']}", *(str(f["class_histogram"][c]) for c in classes),
                      str(f["max_class"]), f"{f['mean_top_response']:.4g}",
                      f"{f['max_response']:.4g}" + (" (all < 0)" if f.get("all_top_negative") else ""))
    console.print(table)
    if len(result["filters"]) > 40:
        console.print(f"... {len(result['filters']) - 40} more filters (see --out or --json)")
    console.print("receptive fields (Table 4): " +
                  ", ".join(f"{k} {rf_text(v)}" for k, v in result["receptive_fields"].items()))
    dead = result["dead_filters"]
    console.print(f"dead filters (pre-ReLU <= 0 everywhere on every image): {len(dead)}"
                  + (": " + ", ".join(f"{d['layer']}:{d['filter']}" for d in dead[:30]) if dead else ""))
    negative = result.get("negative_filters", [])
    if negative:  # their "top" images are only the least negative: worth knowing before reading the figures
        console.print(f"filters whose top responses are all negative (max response < 0): {len(negative)}: "
                      + ", ".join(f"{d['layer']}:{d['filter']}" for d in negative[:30])
                      + (" ..." if len(negative) > 30 else ""))


def register(app: typer.Typer) -> None:
    @app.command("mine")
    def mine(
        model: ModelArg,
        specs: SpecsArg = None,
        filters: FiltersOpt = None,
        every: Annotated[bool, typer.Option("--all", help="Mine every filter of the net.")] = False,
        top: Annotated[int, typer.Option("--top", help="Images kept per filter (K).")] = 20,
        show: Annotated[int, typer.Option("--show", help="Images per filter in the PNG figures (0: no figures).")] = 5,
        backend: BackendOpt = "auto",
        device: DeviceOpt = None,
        arch: ArchOpt = None,
        arch_kw: ArchKwOpt = None,
        mean: MeanOpt = None,
        std: StdOpt = None,
        classes: ClassesOpt = None,
        input_size: InputSizeOpt = None,
        data: DataOpt = "cifar10",
        data_dir: DataDirOpt = None,
        limit: LimitOpt = None,
        batch_size: BatchOpt = 250,
        out: OutOpt = None,
        json: JsonOpt = False,
        executor: ExecutorOpt = "local",
        address: AddressOpt = None,
        cpus_per_task: CpusPerTaskOpt = 1.0,
        gpus_per_task: GpusPerTaskOpt = 0.0,
        ray_cpus: RayCpusOpt = None,
        resume: ResumeOpt = False,
    ) -> None:
        """Mine the test images that excite each filter most (response: spatial sum of the pre-ReLU map), with
        their receptive-field patches, and list the net's filters that never activate.

        Examples: cifarbench mine net1 --filters conv2:0-5 --data test.tar.gz --out mining;
        cifarbench mine net4 --filters conv1 --top 9 --json
        """
        from ..errors import UserError
        from ..filters import resolve_selection

        if top < 1:
            raise UserError(f"--top must be at least 1, got {top}")
        if show < 0:
            raise UserError(f"--show must be at least 0, got {show}")
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        given = [*(filters or []), *(specs or [])]
        from ..io import check_outputs, output_folder
        from ..options import sharding_plan

        dist = sharding_plan(executor, address, cpus_per_task, gpus_per_task, ray_cpus, resume, out, model,
                             {"arch": arch, "arch_kw": arch_kw or None, "mean": mean, "std": std,
                              "classes": classes, "input_size": input_size})

        def select(net):
            selection = resolve_selection(net, given, every)
            if out:  # the per-filter figures' names are known now, before the runtime is built or data read
                check_outputs(out / figure_name(layer, j) for layer, j in selection)
            return selection

        # --out is checked before the model is opened, so a refusal never comes after the work
        with output_folder(out, TABLES, subdirs=("filters", "shards") if dist else ("filters",)):
            from ..options import model_source

            source = model_source(model, arch, arch_kw, mean, std, classes, input_size)
            net, selection, runtime, dataset = open_analysis(source, select, backend, device, data, data_dir, limit,
                                                             open_model=dist is None)
            _mine(runtime, net, dataset, selection, top, show, batch_size, out, json, source=source, dist=dist,
                  backend=backend, device=device)


TABLES = ("top_images.csv", "class_histogram.csv", "responses.csv", "receptive_fields.csv", "dead_filters.csv",
          "mining.json", "index.html")


def figure_name(layer: str, j: int) -> str:
    """``filters/<layer>_filter<j>.png``; a layer name's path characters (ONNX node names such as ``/conv1/Conv``)
    become ``_`` so every figure lands in ``filters/`` itself. Where that changed the name (or shortened a long
    one, or the name already ends like a suffix), 8 hex digits of the name's sha256 follow it, so two layers
    never share a figure (``L/1``, ``L:1`` and ``L_1`` give three files)."""
    import hashlib
    import re

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", layer)
    if safe != layer or len(safe) > 80 or re.search(r"_[0-9a-f]{8}$", safe) or safe.startswith("."):
        safe = f"{safe[:80]}_{hashlib.sha256(layer.encode()).hexdigest()[:8]}"
    return f"filters/{safe}_filter{j}.png"


def _mine(runtime, net, dataset, selection, top, show, batch_size, out, json, *, source=None, dist=None,
          backend="auto", device=None) -> None:
    from ..analysis.mining import mine as run_mine
    from ..console import console, emit_json
    from ..filters import format_selection
    from .publish import command_provenance

    if dist is not None:
        from ..distributed import run_sharded
        from ..options import shard_progress
        from .ablate import sharded_runtime_facts

        bar, update = shard_progress("mine")
        with bar:
            run = run_sharded("mining", dist["model"], dataset, executor=dist["executor"], address=dist["address"],
                              cpus_per_task=dist["cpus_per_task"], gpus_per_task=dist["gpus_per_task"],
                              ray_cpus=dist["ray_cpus"], out=out, resume=dist["resume"], progress=update,
                              model_options=dist["model_options"], backend=backend, device=device,
                              selection=selection, top=top, batch_size=batch_size)
        result = run.result.to_json()
        console.print(f"{run.shards} shards: {run.skipped} resumed, {run.executed} computed "
                      f"({dist['executor']}) in {run.seconds:.1f} s")
        model_prov, facts = source, sharded_runtime_facts(source, backend, device, dist)
    else:
        bar, step = run_progress(len(dataset), "mine")
        with bar:
            result = run_mine(runtime, net, dataset, selection, top, batch_size, progress=step).to_json()
        model_prov, facts = runtime, {}
    extra = {"filters": format_selection(selection), "top": top,
             "response": "spatial sum of the pre-ReLU map; patch: receptive field of its argmax"}
    if dist is not None:
        extra["executor"] = dist["executor"]
    result["provenance"] = command_provenance(model=model_prov, data=dataset, extra=extra, **facts)
    unknown = [f"{f['layer']}:{f['filter']}" for f in result["filters"] if f.get("patch_unknown")]
    if unknown:   # said once, on stderr; the JSON says it per filter ("patch": null, "patch_unknown")
        from ..errors import warn

        why = net.note if getattr(net, "note", "") else "see `cifarbench layers`"
        warn(f"no receptive-field patches (null in JSON, no box in figures) for {', '.join(unknown[:10])}"
             f"{' ...' if len(unknown) > 10 else ''}: their receptive field is unknown ({why})")
    if out:
        written = write_mining(result, dataset, out, min(show, top))
        console.print(f"wrote {len(written)} files under {out}")
    if json:
        emit_json(result)
    else:
        show_mining(result, dataset.classes)
