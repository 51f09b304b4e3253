"""``cifarbench verify``: every backend against a reference on the same real images; exit 1 when out of tolerance.

Tolerances as Polygraphy's ``run --atol/--rtol``: an output element passes when ``|out - ref| <= atol + rtol *
|ref|``; a backend passes when every logit does and its top-1 agreement with the reference is at least ``--top1``.
The reference is torch fp32 eager (contiguous, as the model was written; the ``torch`` row runs channels_last) for
a torch model, ONNX Runtime fp32 of the same file for an ONNX file and the package itself for an AOTInductor
package, or ``--reference BACKEND[:PRECISION]``. The default backends are those the source can run (an ONNX file:
no torch; TorchScript: no torch-compile, no aoti); a row that would run the reference's own model (an int8 ONNX
file opened as ``onnxruntime`` and as ``onnx-int8`` is one session) is dropped, and a run left with nothing to
compare is an error, never a pass. Tolerances must be finite; a NaN or Inf logit on either side fails its row.

Default bounds depend on each backend's precision (:data:`TOLERANCES`): fp32 must match the logits to 1e-4;
reduced precisions are judged the way they are used, by top-1 agreement, with a logit bound loose enough for their
rounding (int8 moves a trained net's logits by ~0.2 of ~10). ``--atol``, ``--rtol`` and ``--top1`` replace the
bound for every backend; the table and the JSON show the bounds applied.
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

        Examples: cifarbench verify net4 --images 500; cifarbench verify my.onnx --backends onnxruntime,onnx-int8 --json
        """
        from ..console import emit_json
        from ..errors import UserError
        from ..options import model_source

        if images < 1:
            raise UserError(f"--images must be at least 1, got {images}")
        check_tolerances(atol, rtol, top1)
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


def check_tolerances(atol, rtol, top1) -> None:
    """Tolerances are finite numbers: ``nan`` or ``inf`` would make every comparison pass (``nan > 0`` is False)."""
    import math

    from ..errors import UserError

    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"{name} {value}: expected a finite number >= 0")
    if top1 is not None and not (math.isfinite(top1) and 0 <= top1 <= 1):
        raise UserError(f"--top1 {top1}: expected a number in 0..1")


_KINDS = {"onnx": "an ONNX model", "aoti": "an AOTInductor package", "tensorrt": "a TensorRT engine",
          "torchscript": "a TorchScript module (torch.compile and torch.export cannot compile TorchScript)"}


def backends_for(source, device) -> list[str]:
    """The concrete backends (no ``auto``) that can run ``source``: those :func:`choose_backend` allows for its
    kind (an ONNX file: no torch; an AOTInductor package: aoti only; TorchScript: no compiling backend)."""
    from ..artifacts import choose_backend
    from ..errors import UserError
    from ..runtime import BACKENDS

    ok = []
    for backend in BACKENDS:
        if backend == "auto":
            continue
        try:
            choose_backend(source, backend, device)
        except UserError:
            continue
        ok.append(backend)
    return ok


def concrete(source, specs, device, option: str) -> list:
    """``specs`` with ``auto`` resolved for this source, in order, each once; a backend the source cannot run is
    one :class:`UserError` naming ``option`` (``--backends`` or ``--reference``) and the backends it can run."""
    from ..artifacts import choose_backend
    from ..errors import UserError
    from ..parity import BackendSpec

    allowed = backends_for(source, device)
    out = []
    for spec in specs:
        if spec.backend == "auto":
            spec = BackendSpec(choose_backend(source, "auto", device), spec.precision)
        if spec.backend not in allowed:
            what = _KINDS.get(source.kind, f"a {source.kind} model")
            raise UserError(f"{option} {spec.backend}: {source.name} is {what}; it runs with {option} "
                            f"{' or '.join(allowed)}")
        if spec not in out:
            out.append(spec)
    return out


def open_backend(source, spec, device, option: str = "--backends", **options):
    """``open_runtime`` for one spec; its errors name this command's option (``--backends``, not ``--backend``)."""
    import re

    from ..errors import UserError
    from ..runtime import open_runtime

    try:
        return open_runtime(source, spec.backend, device=device, precision=spec.precision, **options)
    except UserError as exc:
        raise UserError(re.sub(r"--backend(?![\w-])", option, str(exc))) from None


def identity(rt) -> tuple:
    """What a runtime runs: two runtimes with the same identity compute the same logits (an int8 ONNX file opened
    as ``onnxruntime`` and as ``onnx-int8`` is one session of one file)."""
    path = rt.onnx_path() or getattr(rt, "path", None)
    return rt.name, rt.precision, str(rt.device), str(path) if path else None, getattr(rt, "channels_last", None)


def default_reference(source, device=None):
    """torch fp32 for a source with a torch module, else the backend ``auto`` picks for it on the CPU
    (onnxruntime for an ONNX file, aoti for an AOTInductor package)."""
    import torch

    from ..artifacts import choose_backend
    from ..parity import BackendSpec

    if getattr(source, "module", None) is not None:
        return BackendSpec("torch", "fp32")
    return BackendSpec(choose_backend(source, "auto", torch.device("cpu")), "fp32")


def judge(ref, out, tol: dict) -> tuple[list[str], int]:
    """(failures, logits out of tolerance) of ``out`` against ``ref``: every logit must satisfy ``|out - ref| <=
    atol + rtol * |ref|`` (a NaN on either side never does) and the top-1 agreement must reach ``tol["top1"]``."""
    import torch

    ref, out = ref.double(), out.double()
    diff = (out - ref).abs()
    bound = tol["atol"] + tol["rtol"] * ref.abs()
    bad = ~(diff <= bound)  # NaN compares False: out of tolerance
    failures = []
    for who, t in (("the reference's", ref), ("its", out)):
        nonfinite = int((~torch.isfinite(t)).sum())
        if nonfinite:
            failures.append(f"{nonfinite} of {who} logits are NaN or Inf")
    if bad.any():
        finite = diff[torch.isfinite(diff)]
        worst = f"up to {finite.max().item():.2e}" if len(finite) else "NaN"
        failures.append(f"{int(bad.sum())} logits off by {worst} > atol+rtol*|ref|")
    agreement = (ref.argmax(1) == out.argmax(1)).double().mean().item() if len(ref) else 0.0
    if not agreement >= tol["top1"]:
        failures.append(f"top-1 {agreement:.2%} < {tol['top1']:.2%}")
    return failures, int(bad.sum())


def run_verify(source, backends, reference, atol, rtol, top1, data, data_dir, images, calib, device) -> dict:
    import itertools

    import torch

    from ..console import progress
    from ..errors import UserError
    from ..options import load_test_split
    from ..parity import BackendSpec, default_backends, error_metrics, parse_backends
    from ..runtime import default_device

    check_tolerances(atol, rtol, top1)
    dev = torch.device(device) if device else default_device()
    if reference and len(parse_backends(reference)) != 1:
        raise UserError(f"--reference names one backend, got {reference!r}")
    ref_spec = concrete(source, parse_backends(reference), dev, "--reference")[0] if reference \
        else default_reference(source, dev)
    ref_dev = torch.device("cpu") if ref_spec.backend in ("torch", "onnxruntime") else dev
    if backends:
        specs = concrete(source, parse_backends(backends), dev, "--backends")
    else:  # every backend this source can run here (an ONNX file: no torch; TorchScript: no compile, no aoti)
        allowed = backends_for(source, dev)
        specs = [s for s in default_backends(dev) if s.backend in allowed]
    # the reference itself compares nothing: dropped (torch is kept when named: it runs channels_last, the
    # reference contiguous)
    specs = [s for s in specs if not (s == ref_spec and dev == ref_dev and (not backends or s.backend != "torch"))]
    if not specs:
        allowed = backends_for(source, dev)
        if not backends and allowed == [ref_spec.backend]:
            raise UserError(f"nothing to compare: {source.name} is {_KINDS.get(source.kind, source.kind)} and runs "
                            f"only with {ref_spec.backend}, the reference")
        given = f"--backends {backends}" if backends else f"every backend that can run {source.name} here"
        raise UserError(f"nothing to compare: {given} is the reference {ref_spec.label} itself; name another "
                        f"backend with --backends or --reference")
    test = load_test_split(source, data, data_dir)
    batch = test.subset(slice(0, images)).float_images()
    options = {"calib": calib, "calib_data": data}
    results, skipped = [], []
    with progress() as bar:
        done = itertools.count()
        task = bar.add_task("verify", total=len(specs) + 1, status=ref_spec.label)
        if ref_spec == BackendSpec("torch", "fp32"):  # plain eager: contiguous, the way the model was written
            from ..runtime import TorchRuntime

            ref_rt = TorchRuntime(source, ref_dev, channels_last=False)
        else:
            ref_rt = open_backend(source, ref_spec, ref_dev, "--reference", **options)
        ref = _logits(ref_rt, batch)
        seen = {identity(ref_rt): "the reference"}
        next(done)
        for spec in specs:
            bar.update(task, completed=next(done), status=spec.label)
            rt = open_backend(source, spec, dev, **options)
            out = None if identity(rt) in seen else _logits(rt, batch)
            if identity(rt) in seen:  # the reference's own model and settings (or a row above): compares nothing
                skipped.append({"backend": spec.backend, "precision": spec.precision,
                                "reason": f"runs the same {rt.name} {rt.precision} model as {seen[identity(rt)]}"})
                continue
            seen[identity(rt)] = f"the {rt.name} {rt.precision} row"
            metrics = error_metrics(ref, out)
            tol = tolerance_for(rt.precision, atol, rtol, top1)
            failures, bad = judge(ref, out, tol)
            results.append({"backend": rt.name, "precision": rt.precision, "device": str(rt.device),
                            "passed": not failures, "failures": failures, "tolerance": tol,
                            "out_of_tolerance": bad, **metrics})
        bar.update(task, completed=len(specs) + 1, status="done")
    ref_label = f"{ref_rt.name} {ref_rt.precision} ({ref_rt.device}" + \
        (", contiguous)" if getattr(ref_rt, "channels_last", None) is False else ")")
    if not results:
        names = ", ".join(f"{s['backend']}:{s['precision']}" for s in skipped)
        raise UserError(f"nothing to compare: {names} "
                        f"{'runs' if len(skipped) == 1 else 'run'} the same model as the reference {ref_label}; "
                        f"name another backend with --backends or --reference")
    from .publish import command_provenance

    labels = ",".join(f"{r['backend']}:{r['precision']}" for r in results)
    prov = command_provenance(model=source, data=test.subset(slice(0, images)), backend=labels, device=dev,
                              extra={"reference": ref_label, "calibration": {"images": calib, "data": data}})
    return {"net": source.name, "model": source.describe(), "images": len(batch), "provenance": prov,
            "reference": ref_label,
            "tolerance": {p: tolerance_for(p, atol, rtol, top1) for p in TOLERANCES}, "results": results,
            "skipped": skipped, "passed": bool(results) and all(r["passed"] for r in results)}


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
                        f"atol + rtol*|ref| and top-1 >= bound", width=120,
                  caption="; ".join(f"{s['backend']}:{s['precision']} not compared: {s['reason']}"
                                    for s in report.get("skipped", [])) or None)
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
