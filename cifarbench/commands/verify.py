"""``cifarbench verify``: every backend against a reference on the same real images; exit 1 when out of tolerance.

Tolerances as Polygraphy's ``run --atol/--rtol``: an output element passes when ``|out - ref| <= atol + rtol *
|ref|``; a backend passes when every logit does and its top-1 agreement with the reference is at least ``--top1``.
The reference is torch fp32 for a torch model and ONNX Runtime fp32 of the same file for an ONNX file, or
``--reference BACKEND[:PRECISION]``. Default bounds depend on each backend's precision (:data:`TOLERANCES`): fp32
must match the logits to 1e-4; reduced precisions are judged the way they are used, by top-1 agreement, with a
logit bound loose enough for their rounding (int8 moves a trained net's logits by ~0.2 of ~10). ``--atol``,
``--rtol`` and ``--top1`` replace the bound for every backend; the table and the JSON show the bounds applied.
"""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..options import (ArchKwOpt, ArchOpt, ClassesOpt, DataDirOpt, DataOpt, DeviceOpt, InputSizeOpt, JsonOpt,
                       MeanOpt, ModelArg, OutOpt, StdOpt)

FILES = ("verify.json", "index.html")

#: per-precision default bounds: (atol, rtol, minimum top-1 agreement)
TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-4, "top1": 0.99},
              "fp16": {"atol": 1e-2, "rtol": 1e-2, "top1": 0.99},
              "bf16": {"atol": 1e-1, "rtol": 5e-2, "top1": 0.98},
              "int8": {"atol": 1.0, "rtol": 0.1, "top1": 0.99}}


def tolerance_for(precision: str, atol=None, rtol=None, top1=None) -> dict:
    """The bounds for one backend: the given ones, else its precision's defaults."""
    base = TOLERANCES.get(precision, TOLERANCES["fp32"])
    given = {"atol": atol, "rtol": rtol, "top1": top1}
    return {k: (given[k] if given[k] is not None else v) for k, v in base.items()}


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
        atol: Annotated[Optional[float], typer.Option(
            "--atol", help="Absolute logit tolerance for every backend (default per precision: fp32 1e-4, fp16 "
                           "1e-2, bf16 0.1, int8 1.0).", show_default=False)] = None,
        rtol: Annotated[Optional[float], typer.Option(
            "--rtol", help="Relative logit tolerance, times |reference| (default per precision: fp32 1e-4, fp16 "
                           "1e-2, bf16 0.05, int8 0.1).", show_default=False)] = None,
        top1: Annotated[Optional[float], typer.Option(
            "--top1", help="Minimum top-1 agreement with the reference, 0..1 (default 0.99; bf16 0.98).",
            show_default=False)] = None,
        data: DataOpt = "cifar10",
        data_dir: DataDirOpt = None,
        images: Annotated[int, typer.Option("--images", help="Test images to compare on.")] = 1000,
        calib: Annotated[int, typer.Option("--calib", help="Training images for INT8 calibration.")] = 512,
        device: DeviceOpt = None,
        arch: ArchOpt = None, arch_kw: ArchKwOpt = None, mean: MeanOpt = None, std: StdOpt = None,
        classes: ClassesOpt = None, input_size: InputSizeOpt = None,
        json: JsonOpt = False,
        out: OutOpt = None,
    ) -> None:
        """Per backend: max abs and rel error of logits and probabilities, top-1 agreement, pass/fail.

        Examples: cifarbench verify net4 --images 500; cifarbench verify my.onnx --backends onnx,onnx-int8 --json
        """
        from ..console import emit_json
        from ..errors import UserError
        from ..options import model_source

        if images < 1:
            raise UserError(f"--images must be at least 1, got {images}")
        if (atol is not None and atol < 0) or (rtol is not None and rtol < 0) or \
                (top1 is not None and not 0 <= top1 <= 1):
            raise UserError("--atol and --rtol must be >= 0 and --top1 in 0..1")
        from ..io import output_folder

        with output_folder(out, FILES):  # checked before the model is opened
            source = model_source(model, arch, arch_kw, mean, std, classes, input_size)
            report = run_verify(source, backends, reference, atol, rtol, top1, data, data_dir, images, calib,
                                device)
            if out is not None:
                write_report(report, out)
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
    if not backends:  # the defaults: only the backends that can run this source (an ONNX file: no torch, no aoti)
        from ..artifacts import choose_backend

        def runs(spec) -> bool:
            try:
                choose_backend(source, spec.backend, dev)
                return True
            except UserError:
                return False

        specs = [s for s in specs if runs(s)]
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
            tol = tolerance_for(rt.precision, atol, rtol, top1)
            diff = (out.double() - ref.double()).abs()
            bound = tol["atol"] + tol["rtol"] * ref.double().abs()
            worst = (diff - bound).max().item()
            failures = []
            if worst > 0:
                failures.append(f"logits off by up to {diff.max().item():.2e} > atol+rtol*|ref|")
            if metrics["top1_agreement"] < tol["top1"]:
                failures.append(f"top-1 {metrics['top1_agreement']:.2%} < {tol['top1']:.2%}")
            results.append({"backend": rt.name, "precision": rt.precision, "device": str(rt.device),
                            "passed": not failures, "failures": failures, "tolerance": tol,
                            "out_of_tolerance": int((diff > bound).sum().item()), **metrics})
        bar.update(task, completed=len(specs) + 1, status="done")
    from .publish import command_provenance

    labels = ",".join(f"{r['backend']}:{r['precision']}" for r in results)
    prov = command_provenance(model=source, data=test.subset(slice(0, images)), backend=labels, device=dev,
                              extra={"reference": f"{ref_rt.name} {ref_rt.precision} ({ref_rt.device})",
                                     "calibration": {"images": calib, "data": data}})
    return {"net": source.name, "model": source.describe(), "images": len(batch), "provenance": prov,
            "reference": f"{ref_rt.name} {ref_rt.precision} ({ref_rt.device})",
            "tolerance": {p: tolerance_for(p, atol, rtol, top1) for p in TOLERANCES}, "results": results,
            "passed": all(r["passed"] for r in results)}


def write_report(report: dict, out) -> None:
    from ..io import write_json
    from .publish import write_page

    write_json(out / "verify.json", report)
    columns = ["backend", "precision", "device", "logits_max_abs", "logits_max_rel", "probs_max_abs",
               "top1_agreement", "atol", "rtol", "top1 bound", "passed"]
    rows = [[r["backend"], r["precision"], r["device"], r["logits_max_abs"], r["logits_max_rel"], r["probs_max_abs"],
             r["top1_agreement"], r["tolerance"]["atol"], r["tolerance"]["rtol"], r["tolerance"]["top1"],
             "pass" if r["passed"] else "FAIL: " + "; ".join(r["failures"])] for r in report["results"]]
    write_page(out, f"verify: {report['net']} against {report['reference']}", report["provenance"], [
        {"title": "Backends", "text": f"{report['images']} images; an output passes when |out - ref| <= atol + "
                                      f"rtol * |ref| for every logit and its top-1 agreement reaches the bound.",
         "table": {"columns": columns, "rows": rows}}], report)


def _logits(rt, images, batch: int = 256):
    import torch

    return torch.cat([rt.logits(images[i:i + batch]).float().cpu() for i in range(0, len(images), batch)])


def show(report: dict) -> None:
    from rich.table import Table

    from ..console import console

    table = Table(title=f"{report['net']} vs {report['reference']}, {report['images']} images; pass: |d| <= "
                        f"atol + rtol*|ref| and top-1 >= bound", width=120)
    for col in ("backend", "precision", "device", "logit max abs", "logit max rel", "prob max abs", "top-1",
                "atol / rtol / top-1", "result"):
        table.add_column(col, overflow="fold", no_wrap=col == "backend")
    for r in report["results"]:
        verdict = "[green]pass[/]" if r["passed"] else f"[red]FAIL[/] {'; '.join(r['failures'])}"
        tol = r["tolerance"]
        table.add_row(r["backend"], r["precision"], r["device"], f"{r['logits_max_abs']:.2e}",
                      f"{r['logits_max_rel']:.2e}", f"{r['probs_max_abs']:.2e}", f"{r['top1_agreement']:.2%}",
                      f"{tol['atol']:g} / {tol['rtol']:g} / {tol['top1']:.0%}", verdict)
    console.print(table)
