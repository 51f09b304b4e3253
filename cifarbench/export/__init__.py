"""Export a model to ONNX, INT8 ONNX, AOTInductor or TensorRT: ``export(model, to=..., out=...)``.

``cached_artifact`` does the same into a cache folder keyed by the source checkpoint's sha256 (plus the options
that change the artifact), so ``--backend onnxruntime`` on a zoo name exports once and every later run reuses it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import UserError

TARGETS = ("onnx", "onnx-int8", "aoti", "tensorrt")
SUFFIXES = {"onnx": ".onnx", "onnx-int8": ".onnx", "aoti": ".pt2", "tensorrt": ".engine"}
DEFAULT_CALIB = 512
#: bumped when the quantization recipe changes, so cached INT8 models from an older recipe are not reused
INT8_RECIPE = "v2"


def default_calib_data() -> str:
    """Calibration images come from this source unless the caller names one (``--data``)."""
    return os.environ.get("CIFARBENCH_CALIB_DATA", "cifar10")


def cache_root() -> Path:
    from .. import data  # read at call time: tests point data.CACHE_DIR at a temp folder

    return Path(data.CACHE_DIR) / "artifacts"


def artifact_name(model, to: str, precision: str = "fp32", device: str = "cpu", calib: int = DEFAULT_CALIB,
                  calib_data: str | None = None, seed: int = 0) -> str:
    """File name of a cached artifact: everything besides the weights that changes its content."""
    if to == "onnx":
        tag = "fp32"
    elif to == "onnx-int8":
        slug = re.sub(r"[^A-Za-z0-9]+", "-", calib_data or default_calib_data()).strip("-")[-40:]
        tag = f"int8{INT8_RECIPE}-{calib}-{slug}-s{seed}"
    elif to == "aoti":
        tag = f"{device}-{precision}-torch{torch.__version__.split('+')[0]}"
    else:
        tag = precision
    return f"{model.name}.{tag}{SUFFIXES[to]}"


def cached_artifact(model, to: str, **options) -> Path:
    """The artifact for ``model`` from the cache, exporting it the first time."""
    from .onnx import model_digest

    check_target(to)
    if to == "tensorrt":
        return _cached_engine(model, **options)
    name_opts = {k: v for k, v in options.items() if k in ("precision", "device", "calib", "calib_data", "seed")}
    if "device" in name_opts:
        name_opts["device"] = torch.device(name_opts["device"]).type
    folder = cache_root() / model_digest(model)[:16]
    path = folder / artifact_name(model, to, **name_opts)
    if not path.is_file():
        export(model, to=to, out=path, **options)
    return path


def check_target(to: str) -> None:
    if to not in TARGETS:
        raise UserError(f"unknown export target {to!r}; choose one of {', '.join(TARGETS)}")


def export(model, to: str = "onnx", out: str | Path | None = None, precision: str = "fp32",
           device: str | torch.device = "cpu", calib: int = DEFAULT_CALIB, calib_data: str | None = None,
           data_dir=None, seed: int = 0, max_batch: int | None = None, opt_batch: int | None = None) -> Path:
    """Write ``model`` (a module, zoo name or checkpoint) as a ``to`` artifact at ``out`` and return the path.

    ``precision``: fp32, or fp16/int8 for TensorRT, fp16/bf16 for AOTInductor on CUDA. ``calib`` training images
    from ``calib_data`` calibrate the INT8 targets.
    """
    from ..runtime import resolve_module

    check_target(to)
    model = resolve_module(model)
    out = Path(out) if out else Path(f"{model.name}{'-int8' if to == 'onnx-int8' else ''}{SUFFIXES[to]}")
    if to == "onnx":
        from .onnx import export_onnx

        return export_onnx(model, out)
    if to == "onnx-int8":
        from .int8 import calibration_images, export_int8

        images = calibration_images(calib_data or default_calib_data(), calib, seed, data_dir)
        return export_int8(cached_artifact(model, "onnx"), out, images)
    if to == "aoti":
        from .aoti import export_aoti

        return export_aoti(model, out, device=device, precision=precision)
    from .tensorrt import build_engine, make_profile

    images = None
    if precision == "int8":
        from .int8 import calibration_images

        images = calibration_images(calib_data or default_calib_data(), calib, seed, data_dir)
    profile = make_profile(**({"max_batch": max_batch} if max_batch else {}), opt_batch=opt_batch)
    return build_engine(cached_artifact(model, "onnx"), out, precision=precision, profile=profile,
                        calib_images=images, cache_dir=cache_root() / "tensorrt")


def _cached_engine(model, precision: str = "fp32", max_batch: int | None = None, opt_batch: int | None = None,
                   **options) -> Path:
    """Engines are cached by (ONNX sha256, TensorRT version, GPU name, precision, profile)."""
    from ..checkpoint import file_sha256
    from .tensorrt import _require_tensorrt, engine_cache_key, make_profile

    trt = _require_tensorrt()
    onnx_path = cached_artifact(model, "onnx")
    profile = make_profile(**({"max_batch": max_batch} if max_batch else {}), opt_batch=opt_batch)
    key = engine_cache_key(file_sha256(onnx_path), trt.__version__, torch.cuda.get_device_name(), precision, profile)
    path = cache_root() / "tensorrt" / f"{model.name}-{key}.engine"
    if not path.is_file():
        options.pop("device", None)
        export(model, to="tensorrt", out=path, precision=precision, max_batch=max_batch, opt_batch=opt_batch,
               **options)
    return path
