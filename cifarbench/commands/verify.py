"""``cifarbench verify``: every backend against a reference on the same real images; exit 1 when out of tolerance.

Tolerances as Polygraphy's ``run --atol/--rtol``: an output element passes when ``|out - ref| <= atol + rtol *
|ref|``; a backend passes when every logit does and its top-1 agreement with the reference is at least ``--top1``.
The reference is torch fp32 for a torch model and ONNX Runtime fp32 of the same file for an ONNX file, or
``--reference BACKEND[:PRECISION]``. Defaults suit fp32 backends; give looser bounds for fp16/int8.
"""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..options import (ArchKwOpt, ArchOpt, ClassesOpt, DataDirOpt, DataOpt, DeviceOpt, InputSizeOpt, JsonOpt,
                       MeanOpt, ModelArg, StdOpt)

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
DEFAULT_TOP1 = 0.99


def register(app: typer.Typer) -> None:
    @app.command("verify")
    def verify_cmd(
        model: ModelArg,
        backends: Annotated[Optional[str], typer.Option(
            "--backends", help="Comma list of backend[:precision], e.g. onnxruntime,onnx-int8,tensorrt:fp16 "
                               "(default: every backend available here but the reference).")] = None,
        reference: Annotated[Optional[str], typer.Option(
            "--reference", help="Reference backend[:precision] (default: torch fp32 for a torch model, "
                                "onnxruntime fp32 for an ONNX file).", show_default=False)] = None,
        atol: Annotated[float, typer.Option("--atol", help="Absolute logit tolerance.")] = DEFAULT_ATOL,
        rtol: Annotated[float, typer.Option("--rtol", help="Relative logit tolerance (times |reference|).")]
        = DEFAULT_RTOL,
        top1: Annotated[float, typer.Option("--top1", help="Minimum top-1 agreement with the reference (0..1).")]
        = DEFAULT_TOP1,
        data: DataOpt = "cifar10",
        data_dir: DataDirOpt = None,
        images: Annotated[int, typer.Option("--images", help="Test images to compare on.")] = 1000,
        calib: Annotated[int, typer.Option("--calib", help="Training images for INT8 calibration.")] = 512,
        device: DeviceOpt = None,
        arch: ArchOpt = None, arch_kw: ArchKwOpt = None, mean: MeanOpt = None, std: StdOpt = None,
        classes: ClassesOpt = None, input_size: InputSizeOpt = None,
        json: JsonOpt = False,
    ) -> None:
        """Per backend: max abs and rel error of logits and probabilities, top-1 agreement, pass/fail."""
        from ..console import emit_json
        from ..errors import UserError
        from ..options import model_source

        if images < 1:
            raise UserError(f"--images must be at least 1, got {images}")
        if atol < 0 or rtol < 0 or not 0 <= top1 <= 1:
            raise UserError("--atol and --rtol must be >= 0 and --top1 in 0..1")
        source = model_source(model, arch, arch_kw, mean, std, classes, input_size)
        report = run_verify(source, backends, reference, atol, rtol, top1, data, data_dir, images, calib, device)
        if json:
            emit_json(report)
        else:
            show(report)
        if not report["passed"]:
            raise typer.Exit(1)


def default_reference(source):
    from ..parity import BackendSpec

    torch_model = getattr(source, "module", None) is not None
    return BackendSpec("torch" if torch_model else "onnxruntime", "fp32")


def run_verify(source, backends, reference, atol, rtol, top1, data, data_dir, images, calib, device) -> dict:
    import itertools

    import torch

    from ..console import progress
    from ..data import load_split
    from ..errors import UserError
    from ..options import check_data
    from ..parity import default_backends, error_metrics, parse_backends
    from ..runtime import default_device, open_runtime

    dev = torch.device(device) if device else default_device()
    ref_spec = parse_backends(reference)[0] if reference else default_reference(source)
    if reference and "," in reference:
        raise UserError(f"--reference names one backend, got {reference!r}")
    specs = parse_backends(backends) if backends else [s for s in default_backends(dev) if s != ref_spec]
    if source.module is None:  # no torch module: the torch backends cannot run it
        specs = [s for s in specs if not s.backend.startswith("torch")] if not backends else specs
    test = load_split(data, "test", data_dir, classes=source.classes)
    check_data(source, test)
    batch = test.subset(slice(0, images)).float_images()
    options = {"calib": calib, "calib_data": data}
    ref_dev = torch.device("cpu") if ref_spec.backend in ("torch", "onnxruntime") else dev
    results = []
    with progress() as bar:
        done = itertools.count()
        task = bar.add_task("verify", total=len(specs) + 1, status=ref_spec.label)
        ref_rt = open_runtime(source, ref_spec.backend, device=ref_dev, precision=ref_spec.precision, **options)
        ref = _logits(ref_rt, batch)
        next(done)
        for spec in specs:
            bar.update(task, completed=next(done), status=spec.label)
            rt = open_runtime(source, spec.backend, device=dev, precision=spec.precision, **options)
            out = _logits(rt, batch)
            metrics = error_metrics(ref, out)
            diff = (out.double() - ref.double()).abs()
            bound = atol + rtol * ref.double().abs()
            worst = (diff - bound).max().item()
            failures = []
            if worst > 0:
                failures.append(f"logits off by up to {diff.max().item():.2e} > atol+rtol*|ref|")
            if metrics["top1_agreement"] < top1:
                failures.append(f"top-1 {metrics['top1_agreement']:.2%} < {top1:.2%}")
            results.append({"backend": rt.name, "precision": rt.precision, "device": str(rt.device),
                            "passed": not failures, "failures": failures,
                            "out_of_tolerance": int((diff > bound).sum().item()), **metrics})
        bar.update(task, completed=len(specs) + 1, status="done")
    return {"net": source.name, "model": source.describe(), "images": len(batch),
            "reference": f"{ref_rt.name} {ref_rt.precision} ({ref_rt.device})",
            "tolerance": {"atol": atol, "rtol": rtol, "top1": top1}, "results": results,
            "passed": all(r["passed"] for r in results)}


def _logits(rt, images, batch: int = 256):
    import torch

    return torch.cat([rt.logits(images[i:i + batch]).float().cpu() for i in range(0, len(images), batch)])


def show(report: dict) -> None:
    from rich.table import Table

    from ..console import console

    tol = report["tolerance"]
    table = Table(title=f"{report['net']} vs {report['reference']}, {report['images']} images; pass: |d| <= "
                        f"{tol['atol']:g} + {tol['rtol']:g}*|ref|, top-1 >= {tol['top1']:.0%}", width=120)
    for col in ("backend", "precision", "device", "logit max abs", "logit max rel", "prob max abs", "top-1",
                "result"):
        table.add_column(col, overflow="fold")
    for r in report["results"]:
        verdict = "[green]pass[/]" if r["passed"] else f"[red]FAIL[/] {'; '.join(r['failures'])}"
        table.add_row(r["backend"], r["precision"], r["device"], f"{r['logits_max_abs']:.2e}",
                      f"{r['logits_max_rel']:.2e}", f"{r['probs_max_abs']:.2e}", f"{r['top1_agreement']:.2%}",
                      verdict)
    console.print(table)
