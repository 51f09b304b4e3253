"""``cifarbench export``: any model source to ONNX, INT8 ONNX, AOTInductor or a TensorRT engine.

A torch source (zoo, checkpoint, state_dict + --arch, TorchScript, ExportedProgram) exports to every target; an
ONNX file is its own graph: it goes to ``onnx-int8`` (quantized from the file itself) and ``tensorrt`` (built from
the file), and refuses ``onnx`` (it already is one) and ``aoti`` (needs a torch module) with one line."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..options import (ArchKwOpt, ArchOpt, ClassesOpt, DataDirOpt, DataOpt, DeviceOpt, InputSizeOpt, JsonOpt,
                       MeanOpt, ModelArg, SeedOpt, StdOpt, model_source)


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        model: ModelArg,
        to: Annotated[str, typer.Option("--to", help="onnx | onnx-int8 | aoti | tensorrt")] = "onnx",
        out: Annotated[Optional[Path], typer.Option(
            "--out", "-o", help="Artifact path (default: ./<net>.<ext>); never replaces a file cifarbench did not "
                                "write.")] = None,
        fp16: Annotated[bool, typer.Option("--fp16", help="FP16 engine (tensorrt) or fp16 package (aoti, CUDA).")]
        = False,
        int8: Annotated[bool, typer.Option("--int8", help="INT8 TensorRT engine, calibrated on --calib images.")]
        = False,
        calib: Annotated[int, typer.Option(
            "--calib", help="Training images for INT8 calibration (the bundled set of the CIFAR-10 nets has "
                            "250).")] = 512,
        calib_data: Annotated[Optional[str], typer.Option(
            "--calib-data", help="INT8 calibration images (as --data). Default: the bundled 250-image CIFAR-10 "
                                 "set for a CIFAR-10 32x32 model (offline), else $CIFARBENCH_CALIB_DATA or "
                                 "--data.", show_default=False)] = None,
        data: DataOpt = "cifar10",
        data_dir: DataDirOpt = None,
        calib_method: Annotated[Optional[str], typer.Option(
            "--calib-method", help="onnx-int8: ONNX Runtime's calibration method, minmax | entropy | percentile "
                                   "(default minmax). Through quantize_static, entropy lands on minmax's ranges; "
                                   "percentile clips the top 0.001 %.", show_default=False)] = None,
        quantize_head: Annotated[bool, typer.Option(
            "--quantize-head", help="onnx-int8: int8 weights for the FC head's hidden layers too (the logits layer "
                                    "stays fp32); net4's file shrinks 11.1 -> 4.5 MB, but top-1 agreement can fall "
                                    "under verify's 99 % (bundled net1: 98.75 %).")] = False,
        eval_images: Annotated[int, typer.Option(
            "--eval-images", help="onnx-int8: test images for the fp32-vs-int8 accuracy report (0: skip); the "
                                  "report says how many were used.")] = 1000,
        max_batch: Annotated[Optional[int], typer.Option("--max-batch", help="tensorrt: profile max batch.")]
        = None,
        opt_batch: Annotated[Optional[int], typer.Option("--opt-batch", help="tensorrt: profile opt batch.")]
        = None,
        device: DeviceOpt = None,
        seed: SeedOpt = 0,
        json: JsonOpt = False,
        arch: ArchOpt = None, arch_kw: ArchKwOpt = None, mean: MeanOpt = None, std: StdOpt = None,
        classes: ClassesOpt = None, input_size: InputSizeOpt = None,
    ) -> None:
        """Export MODEL; onnx-int8 also reports test accuracy of the int8 model next to fp32.

        Examples: cifarbench export net4 --to onnx --out net4.onnx;
        cifarbench export net4 --to onnx-int8 --calib-method percentile --eval-images 1000 --data test.tar.gz
        """
        from ..checkpoint import file_sha256
        from ..console import console, emit_json, progress
        from ..errors import UserError
        from ..export import DEFAULT_CALIB_METHOD, SUFFIXES, check_calib_method, check_target, export
        from ..io import output_file
        from ..runtime import default_device

        check_target(to)
        if calib_method is not None:
            check_calib_method(calib_method)
        if (calib_method is not None or quantize_head) and to != "onnx-int8":
            raise UserError("--calib-method and --quantize-head apply to --to onnx-int8")
        if eval_images < 0:
            raise UserError(f"--eval-images must be 0 (no accuracy check) or more, got {eval_images}")
        if fp16 and int8:
            raise UserError("--fp16 and --int8 are exclusive")
        if (fp16 and to not in ("tensorrt", "aoti")) or (int8 and to != "tensorrt"):
            raise UserError("--fp16 applies to tensorrt and aoti, --int8 to tensorrt (use --to onnx-int8 for ONNX)")
        precision = "fp16" if fp16 else "int8" if int8 else "fp32"
        dev = device or (str(default_device()) if to in ("aoti", "tensorrt") else "cpu")
        source = model_source(model, arch, arch_kw, mean, std, classes, input_size)
        if source.module is None and to in ("onnx", "aoti"):
            raise UserError(f"{source.name} is an ONNX file: it already is --to onnx, and --to aoti needs a torch "
                            f"model (give its state_dict with --arch, TorchScript or .pt2)" if source.onnx_path else
                            f"{source.name} is an AOTInductor package; it exports to nothing else: give the model "
                            f"it was built from")
        if out is None:
            out = Path(f"{source.name}{'-int8' if to == 'onnx-int8' else ''}{SUFFIXES[to]}")
        else:
            # every reader tells a model's format by its suffix: an AOTInductor package named .onnx would be opened
            # as a (corrupt) ONNX file later
            allowed = (".engine", ".plan") if to == "tensorrt" else (SUFFIXES[to],)
            if Path(out).suffix.lower() not in allowed:
                raise UserError(f"--out {out}: a --to {to} artifact is a {' or '.join(allowed)} file; name it "
                                f"{Path(out).with_suffix(allowed[0]).name}")
        test_set = None
        if to == "onnx-int8" and eval_images > 0:
            # read before minutes of calibration, and before an artifact is written that a failed check would leave
            from ..data import load_split

            try:
                test_set = load_split(data, "test", data_dir)
            except UserError as exc:
                raise UserError(f"the int8 accuracy check reads --data's test images: {exc}; or skip the check "
                                f"with --eval-images 0") from None
        start = time.perf_counter()
        # the artifact path is checked before exporting: never a file of the user's replaced, never a refusal
        # after minutes of calibration
        with output_file(out):
            from ..export import uses_bundled_calibration

            if calib_data is None and not uses_bundled_calibration(source):
                calib_data = data   # a model of other classes or size calibrates on the user's --data
            int8_options = {}
            if to == "onnx-int8":
                int8_options = {"calib_method": calib_method or DEFAULT_CALIB_METHOD, "quantize_head": quantize_head}
            with progress() as bar:
                task = bar.add_task("calibrate", total=None, status=int8_options.get("calib_method", ""),
                                    visible=to == "onnx-int8")
                path = export(source, to=to, out=out, precision=precision, device=dev, calib=calib,
                              calib_data=calib_data, data_dir=data_dir, seed=seed, max_batch=max_batch,
                              opt_batch=opt_batch, **int8_options,
                              progress=lambda done, total: bar.update(task, completed=done, total=total))
        result = {"artifact": str(path), "target": to, "net": source.name, "model": source.describe(),
                  "precision": "int8" if to == "onnx-int8" else precision, "bytes": path.stat().st_size,
                  "sha256": file_sha256(path), "seconds": round(time.perf_counter() - start, 2)}
        from .publish import command_provenance

        result["provenance"] = command_provenance(model=source, backend=to, precision=result["precision"],
                                                  device=dev)
        if to == "onnx-int8" or int8:
            result["calibration"] = {"data": calib_data or "bundled calibration set", "images_requested": calib}
        if to == "onnx-int8":
            from ..export.int8 import precision_report
            from ..formats import load_onnx, read_metadata

            proto = load_onnx(path)
            meta = read_metadata(proto)  # what the artifact itself records, read back
            result["calibration"].update(method=meta.get("calib_method"), images=int(meta.get("calib_images", 0)))
            result["quantization"] = {"calib_method": meta.get("calib_method"),
                                      "quantize_head": meta.get("quantize_head") == "true", **precision_report(proto)}
        if to == "onnx-int8" and eval_images > 0:
            from ..artifacts import int8_accuracy_report
            from .verify import TOLERANCES

            with progress() as bar:
                task = bar.add_task("accuracy", total=None, status="fp32 and int8 on test images")
                result["accuracy"] = int8_accuracy_report(
                    source, path, test_set, data_dir, eval_images,
                    progress=lambda done, total: bar.update(task, completed=done, total=total))
            bound = TOLERANCES["int8"]["top1"]
            if result["accuracy"]["top1_agreement"] < bound:
                from ..errors import warn

                warn(f"int8 top-1 agreement with fp32 is {result['accuracy']['top1_agreement']:.2%}, under the "
                     f"{bound:.0%} that cifarbench verify requires of int8")
        if json:
            emit_json(result)
            return
        console.print(f"wrote {result['artifact']} ({result['bytes'] / 1e6:.1f} MB, {result['precision']}) "
                      f"in {result['seconds']:.1f} s")
        if "quantization" in result:
            show_quantization(result)
        if "accuracy" in result:
            a = result["accuracy"]
            console.print(f"test accuracy on {a['images']} images: fp32 {a['fp32']:.2%}, int8 {a['int8']:.2%} "
                          f"(drop {a['drop']:+.2%}), top-1 agreement {a['top1_agreement']:.2%}")


def show_quantization(result: dict) -> None:
    """The calibration and which layers stay fp32, with their weight bytes and why (stderr)."""
    from rich.table import Table

    from ..console import console

    q, c = result["quantization"], result["calibration"]
    b = q["bytes"]
    console.print(f"calibration: {q['calib_method']} on {c['images']} images ({c['data']}); weights "
                  f"{_mb(b['int8'])} int8, {_mb(b['fp32'])} fp32, {_mb(b['other'])} other "
                  f"(int32 biases, shapes)")
    layers = q["fp32_layers"]
    if not layers:
        console.print("every Conv/Gemm/MatMul layer has int8 weights")
        return
    table = Table(title=f"{len(layers)} layer{'s' if len(layers) > 1 else ''} with fp32 weights "
                        f"({_mb(sum(x['weight_bytes'] for x in layers))})")
    for col in ("node", "op", "weight", "bytes", "why"):
        table.add_column(col, justify="right" if col == "bytes" else "left", overflow="fold")
    for x in layers:
        table.add_row(x["name"], x["op"], x["weight"], _mb(x["weight_bytes"]), x["why"])
    console.print(table)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
