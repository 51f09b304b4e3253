"""``cifarbench ablate``: filter-zeroed variants with per-class tables and confusion matrices, and whole-layer
sweeps ranked by accuracy drop."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..options import (AddressOpt, ArchKwOpt, ArchOpt, BackendOpt, ClassesOpt, CpusPerTaskOpt, DataDirOpt, DataOpt,
                       DeviceOpt, ExecutorOpt, GpusPerTaskOpt, InputSizeOpt, JsonOpt, MeanOpt, ModelArg, OutOpt,
                       RayCpusOpt, ResumeOpt, StdOpt)

SpecsArg = Annotated[Optional[list[str]], typer.Argument(
    help="More filter specs, so that `--filters conv1:0,1 conv2:0,1` works unquoted.", show_default=False)]
FiltersOpt = Annotated[Optional[list[str]], typer.Option(
    "--filters", "-f", help="Filters as LAYER:I[,J,...] (ranges I-J allowed), e.g. conv1:0,1 conv2:0,1; "
                            "default: filters 0 and 1 of conv1..conv5 (the report's).")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Use only the first N test images.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per runtime call.")]


def open_analysis(source, select, backend: str, device: str | None, data: str, data_dir, limit: int | None,
                  open_model: bool = True):
    """(layer table, selection, runtime, test split) for an analysis command on a resolved model source; every
    mistake a UserError. ``select(table)`` resolves the filters (named by the model's own layer names) before the
    runtime is built, so a bad spec fails fast; the data's labels are matched to the source's class names.
    ``open_model`` False: no runtime (None; sharded runs open the model where each shard runs)."""
    from ..errors import UserError
    from ..filters import layer_table
    from ..options import load_test_split
    from ..runtime import open_runtime

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    table = layer_table(source)
    selection = select(table)
    dataset = load_test_split(source, data, data_dir)
    if limit is not None:
        dataset = dataset.subset(slice(0, limit))
    runtime = open_runtime(source, backend=backend, device=device) if open_model else None
    return table, selection, runtime, dataset


def sharded_runtime_facts(source, backend: str, device: str | None, dist: dict) -> dict:
    """``{backend, precision, device}`` of the runtimes a sharded run's shards open (each opens its own, so the
    driver has none to ask): the device is ``--device``, else the driver's default for local shards, else what a
    Ray task sees (a GPU only with ``--gpus-per-task`` > 0); the backend is what ``auto`` picks on that device; the
    precision is what that backend runs this source in: fp32 for torch backends (shards use the default
    precision), the graph's own for ONNX Runtime, int8 for onnx-int8, and None (unknown) where only the built
    artifact knows (AOTInductor, TensorRT)."""
    from ..artifacts import choose_backend
    from ..runtime import default_device, parse_device

    if device:
        dev = parse_device(device, require_present=False)
    elif dist["executor"] == "ray":
        import torch

        dev = torch.device("cuda" if dist.get("gpus_per_task") else "cpu")
    else:
        dev = default_device()
    name = choose_backend(source, backend, dev)
    precision = None
    if name in ("torch", "torch-compile"):
        precision = "fp32"
    elif name == "onnx-int8":
        precision = "int8"
    elif name == "onnxruntime":
        if source.onnx_path is not None:
            import onnx

            from ..formats import graph_precision

            precision = graph_precision(onnx.load(str(source.onnx_path), load_external_data=False))
        else:
            precision = "fp32"   # a torch model exported to fp32 ONNX
    return {"backend": name, "precision": precision, "device": dev}


def run_progress(total: int, what: str):
    """(progress context, advance callback) on stderr."""
    from ..console import progress

    bar = progress()
    task = bar.add_task(what, total=total, status="")
    return bar, lambda n: bar.advance(task, n)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _csv(rows) -> str:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6f}"


def write_ablation(result: dict, data, out: Path) -> list[Path]:
    import numpy as np

    from ..analysis.figures import confusion_figure, filters_text, flipped_grid
    from ..io import write_json, write_text
    from .publish import figure_caption, write_page

    classes = list(data.classes)
    b, a, d = result["before"], result["after"], result["difference"]
    rows = [["class", "before", "after", "difference_before_minus_after"]]
    rows += [[c, _fmt(b["per_class"][c]), _fmt(a["per_class"][c]), _fmt(d["per_class"][c])] for c in classes]
    rows.append(["overall", _fmt(b["accuracy"]), _fmt(a["accuracy"]), _fmt(d["accuracy"])])
    paths = [out / "per_class.csv", out / "ablation.json"]
    write_text(paths[0], _csv(rows))
    write_json(paths[1], result)
    before, after = np.array(result["confusion"]["before"]), np.array(result["confusion"]["after"])
    for name, mat in (("before", before), ("after", after), ("diff", after - before)):
        path = out / f"confusion_{name}.csv"
        # the diff's sign is said in its corner cell: counts after minus before (per_class.csv's is before - after)
        corner = "true \\ predicted" + (" (after - before)" if name == "diff" else "")
        write_text(path, _csv([[corner, *classes], *([c, *map(int, r)] for c, r in zip(classes, mat))]))
        paths.append(path)
    prov = result.get("provenance") or {}
    name = (prov.get("model") or {}).get("name") or "model"
    zeroed = filters_text(result["filters"])
    caption = figure_caption(prov, f"zeroed {zeroed}")
    # the figures' titles name the zeroed filters themselves; ``title`` puts the model first
    paths.append(confusion_figure(before, after, classes, out / "confusion.png", filters=result["filters"],
                                  title=name, caption=caption))
    images = [data.images[f["index"]].numpy() for f in result["flipped"]]
    paths.append(flipped_grid(images, result["flipped"], out / "flipped.png", filters=result["filters"],
                              title=name, caption=caption))
    rows = [[c, b["per_class"][c], a["per_class"][c], d["per_class"][c]] for c in classes]
    rows.append(["overall", b["accuracy"], a["accuracy"], d["accuracy"]])
    paths.append(write_page(out, f"ablate: {name}, zeroed {zeroed}", prov, [
        {"title": "Per-class accuracy", "text": "Accuracies are fractions; difference = before − after.",
         "table": {"columns": ["class", "before", "after", "difference (before − after)"], "rows": rows}},
        {"title": "Confusion matrices", "figures": [paths[-2]]},
        {"title": "Flipped images", "text": f"{len(result['flipped'])} images right before and wrong after.",
         "figures": [paths[-1]] if result["flipped"] else []},
    ], result))
    return paths


def _gainer(row: dict, kind: str) -> str:
    """The class of a sweep row's largest gain (``kind="gain"``) or loss, ``none`` when no class gained (lost):
    a table naming a class beside +0.000000 would say it gained (the JSON's class is null then)."""
    from ..analysis.figures import change_text

    change = row[f"largest_{kind}"]
    return "none" if change_text(change, kind) == "none" else str(change["class"])


def write_sweep(result: dict, out: Path) -> list[Path]:
    from ..analysis.figures import sweep_figure
    from ..io import write_json, write_text
    from .publish import figure_caption, write_page

    rows = [["rank", "layer", "filter", "accuracy", "drop", "largest_gain_class", "largest_gain",
             "largest_loss_class", "largest_loss"]]
    rows += [[r["rank"], r["layer"], r["filter"], _fmt(r["accuracy"]), _fmt(r["drop"]), _gainer(r, "gain"),
              _fmt(r["largest_gain"]["change"]), _gainer(r, "loss"), _fmt(r["largest_loss"]["change"])]
             for r in result["filters"]]
    write_text(out / "sweep.csv", _csv(rows))
    write_json(out / "sweep.json", result)
    prov = result.get("provenance") or {}
    name = (prov.get("model") or {}).get("name") or "model"
    layers = ", ".join(result["layers"])
    fig = sweep_figure(result, out / "sweep.png", title=name,
                       caption=figure_caption(prov, f"sweep of {layers}"))
    table = {"columns": ["rank", "layer", "filter", "accuracy", "drop (before − after)", "largest gain class",
                         "largest gain", "largest loss class", "largest loss"],
             "rows": [[r["rank"], r["layer"], r["filter"], r["accuracy"], r["drop"], _gainer(r, "gain"),
                       r["largest_gain"]["change"], _gainer(r, "loss"), r["largest_loss"]["change"]]
                      for r in result["filters"]]}
    page = write_page(out, f"ablation sweep: {name}, {layers}", prov, [
        {"title": "Filters ranked by accuracy drop",
         "text": f"Baseline accuracy {result['baseline']['accuracy']:.4f}; fractions; drop = before − after, "
                 f"change = after − before.", "figures": [fig], "table": table}], result)
    return [out / "sweep.csv", out / "sweep.json", fig, page]


def show_ablation(result: dict, classes) -> None:
    from rich.table import Table

    from ..console import console

    names = ", ".join(f"{f['layer']}:{f['filter']}" for f in result["filters"])
    table = Table(title=f"per-class accuracy (%), filters zeroed: {names}")
    for col in ("class", "before", "after", "difference (before − after)"):
        table.add_column(col, justify="right" if col != "class" else "left")
    b, a, d = result["before"], result["after"], result["difference"]
    for c in classes:
        table.add_row(c, _pct(b["per_class"][c]), _pct(a["per_class"][c]), _pct(d["per_class"][c]))
    table.add_row("overall", _pct(b["accuracy"]), _pct(a["accuracy"]), _pct(d["accuracy"]), style="bold")
    console.print(table)
    console.print(f"{len(result['flipped'])} images right before and wrong after")


def show_sweep(result: dict, top: int = 20) -> None:
    from rich.table import Table

    from ..console import console

    table = Table(title=f"filters ranked by accuracy drop (baseline {_pct(result['baseline']['accuracy'])} %)")
    for col in ("rank", "filter", "accuracy %", "drop pp (before − after)", "largest gain pp", "largest loss pp"):
        table.add_column(col)
    from ..analysis.figures import change_text

    for r in result["filters"][:top]:
        # "none" where no class gained (or lost): a class named with 0.00 did not gain
        table.add_row(str(r["rank"]), f"{r['layer']}:{r['filter']}", _pct(r["accuracy"]), _pct(r["drop"]),
                      change_text(r["largest_gain"], "gain"), change_text(r["largest_loss"], "loss"))
    console.print(table)
    if len(result["filters"]) > top:
        console.print(f"... {len(result['filters']) - top} more filters (see --out or --json)")


def register(app: typer.Typer) -> None:
    @app.command("ablate")
    def ablate(
        model: ModelArg,
        specs: SpecsArg = None,
        filters: FiltersOpt = None,
        zero_bias: Annotated[bool, typer.Option("--zero-bias", help="Zero the filters' biases too.")] = False,
        sweep: Annotated[Optional[str], typer.Option(
            "--sweep", help="Ablate each filter of LAYER on its own (conv3, conv3,conv5 or all) and rank them.",
            show_default=False)] = None,
        flipped: Annotated[int, typer.Option(
            "--flipped", help="Look for right-before, wrong-after images among the first N test images.")] = 256,
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
        """Zero filters and compare per-class accuracy and confusion matrices before and after (the report's
        Table 1), or sweep every filter of a layer and rank the filters by accuracy drop.

        Examples: cifarbench ablate net1 --filters conv1:0,3 --out ablation;
        cifarbench ablate net4 --sweep conv2 --data test.tar.gz --json
        """
        from ..errors import UserError
        from ..filters import all_filters, resolve_layers, resolve_selection

        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        given = [*(filters or []), *(specs or [])]
        if sweep is not None and given:
            raise UserError("give either --sweep or filter specs, not both")

        def select(net):
            return all_filters(net, resolve_layers(net, sweep)) if sweep is not None else resolve_selection(net, given)

        from ..io import output_folder
        from ..options import sharding_plan

        dist = sharding_plan(executor, address, cpus_per_task, gpus_per_task, ray_cpus, resume, out, model,
                             {"arch": arch, "arch_kw": arch_kw or None, "mean": mean, "std": std,
                              "classes": classes, "input_size": input_size})
        # --out is checked before the model is opened, so a refusal never comes after the work
        with output_folder(out, SWEEP_FILES if sweep is not None else ABLATION_FILES,
                           subdirs=("shards",) if dist else ()):
            from ..options import model_source

            source = model_source(model, arch, arch_kw, mean, std, classes, input_size)
            net, selection, runtime, dataset = open_analysis(source, select, backend, device, data, data_dir, limit,
                                                             open_model=dist is None)
            _ablate(net, selection, runtime, dataset, sweep, zero_bias, flipped, batch_size, out, json,
                    source=source, dist=dist, backend=backend, device=device)


ABLATION_FILES = ("per_class.csv", "ablation.json", "confusion_before.csv", "confusion_after.csv",
                  "confusion_diff.csv", "confusion.png", "flipped.png", "index.html")
SWEEP_FILES = ("sweep.csv", "sweep.json", "sweep.png", "index.html")


def _ablate(net, selection, runtime, dataset, sweep, zero_bias, flipped, batch_size, out, json, *, source=None,
            dist=None, backend="auto", device=None) -> None:
    from ..analysis.ablation import ablate as run_ablate
    from ..analysis.ablation import sweep as run_sweep
    from ..console import console, emit_json
    from ..filters import format_selection
    from .publish import command_provenance

    what = "sweep" if sweep is not None else "ablate"
    if dist is not None:
        from ..distributed import run_sharded
        from ..options import shard_progress

        bar, update = shard_progress(what)
        with bar:
            run = run_sharded("ablation", dist["model"], dataset, executor=dist["executor"],
                              address=dist["address"], cpus_per_task=dist["cpus_per_task"],
                              gpus_per_task=dist["gpus_per_task"], ray_cpus=dist["ray_cpus"], out=out,
                              resume=dist["resume"], progress=update, model_options=dist["model_options"],
                              backend=backend, device=device, selection=selection, zero_bias=zero_bias,
                              batch_size=batch_size, sweep=sweep is not None,
                              **({} if sweep is not None else {"flipped": flipped}))
        result = run.result
        console.print(f"{run.shards} shards: {run.skipped} resumed, {run.executed} computed "
                      f"({dist['executor']}) in {run.seconds:.1f} s")
        model_prov, facts = source, sharded_runtime_facts(source, backend, device, dist)
    else:
        model_prov, facts = runtime, {}
        if sweep is not None:
            console.print(f"sweeping {len(selection)} filters on {len(dataset)} images with {runtime.name}")
            from ..analysis.ablation import torch_module_of
            from ..nets import CifarNet

            # one pass for the zoo nets' stacked sweep on a torch module, else one per variant
            passes = 1 if isinstance(torch_module_of(runtime), CifarNet) else 1 + len(selection)
            bar, step = run_progress(passes * len(dataset), "sweep")
            with bar:
                result = run_sweep(runtime, net, dataset, selection, zero_bias, batch_size, step)
        else:
            bar, step = run_progress(2 * len(dataset), "ablate")
            with bar:
                result = run_ablate(runtime, net, dataset, selection, zero_bias, flipped, batch_size, step)
    if zero_bias and "zero_bias" not in result:   # sharded results are merged without it: the same note here
        from ..analysis.ablation import zero_bias_note

        note = zero_bias_note(source if runtime is None else runtime, net, selection)
        if note:
            result["zero_bias"] = note
    if zero_bias and result.get("zero_bias"):
        from ..errors import warn

        fused = [layer for layer, what in result["zero_bias"]["zeroed"].items() if what == "fused bias"]
        warn(f"--zero-bias on {', '.join(fused[:5])}{' ...' if len(fused) > 5 else ''}: "
             f"{result['zero_bias']['note']}")
    extra = {"filters": format_selection(selection), "zero_bias": zero_bias}
    if sweep is not None:
        extra.update(sweep=sweep, drop="before − after (accuracy fractions)")
    else:
        extra["difference"] = "before − after"
    if dist is not None:
        extra["executor"] = dist["executor"]
    result["provenance"] = command_provenance(model=model_prov, data=dataset, extra=extra, **facts)
    if sweep is not None:
        if out:
            for p in write_sweep(result, out):
                console.print(f"wrote {p}")
        if json:
            emit_json(result)
        else:
            show_sweep(result)
        return
    if out:
        for p in write_ablation(result, dataset, out):
            console.print(f"wrote {p}")
    if json:
        emit_json(result)
    else:
        show_ablation(result, dataset.classes)
