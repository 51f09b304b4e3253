"""``cifarbench bench``: throughput, latency percentiles and GFLOP/s per backend, precision and batch; renders
and compares saved runs, its own and pytest-benchmark JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..options import (ArchKwOpt, ArchOpt, ClassesOpt, DeviceOpt, InputSizeOpt, JsonOpt, MeanOpt, StdOpt,
                       model_source)


def parse_batches(text: str) -> list[int]:
    from ..errors import UserError

    try:
        batches = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--batch {text!r}: expected a comma list of integers such as 1,64,625") from None
    if not batches or min(batches) < 1:
        raise UserError(f"--batch {text!r}: batch sizes must be positive")
    return list(dict.fromkeys(batches))  # each size once: a repeated one would make two rows of one key


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        model: Annotated[Optional[str], typer.Argument(
            help="Model to benchmark: zoo name, checkpoint, ONNX, TorchScript, .pt2, or state_dict with --arch "
                 "(not needed with --from).", show_default=False)] = None,
        backends: Annotated[Optional[str], typer.Option(
            "--backends", help="Comma list of backend[:precision] (default: torch and the auto backend).")] = None,
        batch: Annotated[str, typer.Option("--batch", help="Comma list of batch sizes.")] = "1,64,625",
        iters: Annotated[int, typer.Option("--iters", help="Timed calls per batch size (at least).")] = 20,
        warmup: Annotated[int, typer.Option("--warmup", help="Untimed calls first.")] = 3,
        min_seconds: Annotated[float, typer.Option("--min-seconds", help="Keep timing until this much time.")] = 0.0,
        calib_data: Annotated[Optional[str], typer.Option(
            "--calib-data", help="INT8 calibration images (as --data; default $CIFARBENCH_CALIB_DATA or cifar10).")]
        = None,
        device: DeviceOpt = None,
        out: Annotated[Optional[Path], typer.Option(
            "--out", "-o", help="Write the run as JSON here, and its page beside it (run.json -> run.html).")]
        = None,
        from_: Annotated[Optional[Path], typer.Option(
            "--from", help="Render a saved run (bench --out, or pytest --benchmark-json) instead of measuring.")]
        = None,
        compare_: Annotated[Optional[Path], typer.Option(
            "--compare", help="With --from: compare with this run (rows pair by backend, precision and batch, "
                              "on any devices: a CPU run against a GPU run).")] = None,
        allow_different_models: Annotated[bool, typer.Option(
            "--allow-different-models", help="With --compare: compare runs of two different models (refused "
                                             "otherwise; the table then says so).")] = False,
        json: JsonOpt = False,
        arch: ArchOpt = None, arch_kw: ArchKwOpt = None, mean: MeanOpt = None, std: StdOpt = None,
        classes: ClassesOpt = None, input_size: InputSizeOpt = None,
    ) -> None:
        """Benchmark MODEL, or render (--from) and compare (--compare) saved runs.

        Examples: cifarbench bench net4 --backends torch,onnxruntime,onnx-int8 --batch 1,64 --out bench.json;
        cifarbench bench --from bench.json > report.txt; cifarbench bench --from cpu.json --compare gpu.json
        """
        import torch

        from ..console import console, emit_json, make_console
        from ..errors import UserError
        from ..io import output_file
        from ..timing import (compare, compare_table, load_results, model_identity, results_table, same_model,
                              unpaired)

        if from_ is not None:
            # a rendered report is the command's result: stdout (``bench --from run.json > report.txt``), whole
            # lines when that is a file or pipe; measuring runs keep their tables on stderr beside the progress
            report = make_console(stderr=False)
            if model is not None:
                raise UserError("give either MODEL (to measure) or --from (to render a saved run), not both")
            from .. import bench_report

            doc = load_results(from_)
            pytest_json = bench_report.is_pytest_benchmark(doc)
            if compare_ is None:
                if json:
                    emit_json(bench_report.report(doc) if pytest_json else doc)
                else:
                    report.print(bench_report.report_table(doc) if pytest_json else results_table(doc))
                return
            other = load_results(compare_)
            if bench_report.is_pytest_benchmark(other) != pytest_json:
                kinds = ("a cifarbench bench run", "pytest-benchmark JSON")
                raise UserError(f"cannot compare {from_} ({kinds[pytest_json]}) with {compare_} "
                                f"({kinds[not pytest_json]}): give two runs of the same kind")
            if pytest_json:
                rows = bench_report.compare_rows(doc, other, str(from_), str(compare_))
                if json:
                    emit_json({"base": str(from_), "other": str(compare_), "rows": rows})
                else:
                    report.print(bench_report.compare_table(rows, str(from_), str(compare_)))
                return
            rows = compare(doc, other, str(from_), str(compare_), allow_different_models)
            same = same_model(doc, other)
            note = None if same else f"DIFFERENT MODELS: {doc['net']} vs {other['net']}"
            alone = unpaired(doc, other)
            if json:
                emit_json({"base": str(from_), "other": str(compare_), "same_model": same,
                           "models": {"base": model_identity(doc)[0], "other": model_identity(other)[0]},
                           "rows": rows, "unpaired": alone})
            else:
                report.print(compare_table(rows, str(from_), str(compare_), note))
                for side, path in (("base", from_), ("other", compare_)):
                    if alone[side]:
                        console.print(f"only in {path} (not compared): {', '.join(alone[side])}")
            return
        if compare_ is not None:
            raise UserError("--compare needs --from (the run to compare against)")
        if allow_different_models:
            raise UserError("--allow-different-models goes with --from and --compare")
        if model is None:
            raise UserError("give a MODEL to benchmark, or --from RESULTS.json")
        if iters < 1 or warmup < 0:
            raise UserError("--iters must be >= 1 and --warmup >= 0")
        import math

        if not (math.isfinite(min_seconds) and min_seconds >= 0):
            raise UserError(f"--min-seconds {min_seconds}: expected a finite number of seconds >= 0")
        batches = parse_batches(batch)
        from ..parity import BackendSpec, parse_backends
        from ..runtime import default_device
        from ..timing import check_batch_memory
        from .verify import concrete

        dev = torch.device(device) if device else default_device()
        source = model_source(model, arch, arch_kw, mean, std, classes, input_size)
        if backends:  # auto resolved for this source, each backend once, one it cannot run refused by name
            specs = concrete(source, parse_backends(backends), dev, "--backends")
        else:  # torch where the source has a module, and the backend auto picks for it (aoti for a package)
            first = [BackendSpec("torch", "fp32")] if source.module is not None else []
            specs = concrete(source, first + [BackendSpec("auto", "fp32")], dev, "--backends")
        check_batch_memory(batches, source.input_size, dev)  # before any runtime is opened or batch allocated
        page = page_path(out)
        with output_file(out), output_file(page):  # --out (and its page) are checked before measuring
            _measure(source, specs, batches, dev, warmup, iters, min_seconds, calib_data, out, json)


def page_path(out: Path | None) -> Path | None:
    """bench's ``--out`` is a JSON file: its page is the same name with ``.html`` (``run.json`` -> ``run.html``)."""
    if out is None:
        return None
    page = out.with_suffix(".html")
    return page if page != out else out.with_name(out.name + ".report.html")


def flops_per_image(source) -> int | None:
    """Multiply-accumulates x 2 per image: counted from the zoo net's layers, else None (not guessed)."""
    from ..nets import CifarNet, count_flops

    return count_flops(source.module) if isinstance(source.module, CifarNet) else None


def _measure(source, specs, batches, dev, warmup, iters, min_seconds, calib_data, out, json) -> None:
    import itertools
    from datetime import datetime, timezone

    from ..console import console, emit_json, progress
    from ..io import write_json
    from ..timing import FORMAT, bench_runtime, machine, results_table
    from .verify import identity, open_backend

    flops = flops_per_image(source)
    options = {"calib_data": calib_data} if calib_data else {}
    rows, seen, skipped = [], {}, []
    with progress() as bar:
        done = itertools.count()  # backends finished before the one starting now
        task = bar.add_task("bench", total=len(specs), status="")
        for spec in specs:
            bar.update(task, completed=next(done), status=spec.label)
            rt = open_backend(source, spec, dev, **options)
            if identity(rt) in seen:  # e.g. onnxruntime and onnx-int8 of an int8 file: one session, measured once
                skipped.append({"backend": spec.label, "same_as": seen[identity(rt)]})
                console.print(f"{spec.label}: the same runtime as {seen[identity(rt)]} for {source.name}; measured "
                              f"once, as {seen[identity(rt)]}")
                continue
            seen[identity(rt)] = spec.label
            rows += bench_runtime(rt, batches, warmup, iters, min_seconds, flops)
        bar.update(task, completed=len(specs), status="done")
    doc = {"format": FORMAT, "net": source.name, "source": str(source.path or "in-memory"), "model": source.describe(),
           "flops_per_image": flops, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "warmup": warmup, "iters": iters, "results": rows,
           **({"skipped": skipped} if skipped else {})}
    from .publish import command_provenance, write_page_file

    doc["provenance"] = command_provenance(model=source, data=None, device=dev,
                                           backend=",".join(s.label for s in specs),
                                           extra={"batches": batches, "warmup": warmup, "iters": iters,
                                                  "input": f"uniform random [0, 1] images, "
                                                           f"{source.input_size}x{source.input_size}"})
    if out is not None:
        write_json(out, doc)
        from ..timing import batch_label

        columns = ["backend", "precision", "device", "batch", "images_per_s (batch / mean)", "mean ms", "p50 ms",
                   "p90 ms", "gflops"]
        table = {"columns": columns,
                 "rows": [[r["backend"], r["precision"], r["device"], batch_label(r), r["images_per_s"],
                           r["latency_ms"]["mean"], r["latency_ms"]["p50"], r["latency_ms"]["p90"], r["gflops"]]
                          for r in rows]}
        write_page_file(page_path(out), f"bench: {source.name}", doc["provenance"],
                        [{"title": "Throughput and latency", "table": table}], doc)
    if json:
        emit_json(doc)
    else:
        console.print(results_table(doc))
