"""Export a model to ONNX, INT8 ONNX, AOTInductor or TensorRT: ``export(model, to=..., out=...)``.

``cached_artifact`` does the same into a cache folder, under a key of everything that determines the artifact's
bytes (:func:`artifact_recipe`): the weights' digest, the target and its options, the calibration images' own
bytes for INT8, the exporter's recipe version and the versions of cifarbench, torch, onnx (and opset), onnxscript
and onnxruntime. So ``--backend onnxruntime`` on a zoo name exports once and every later run reuses it, while
other weights, other calibration images (even under the same file name) or an upgraded library get a new one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import UserError

TARGETS = ("onnx", "onnx-int8", "aoti", "tensorrt")
SUFFIXES = {"onnx": ".onnx", "onnx-int8": ".onnx", "aoti": ".pt2", "tensorrt": ".engine"}
DEFAULT_CALIB = 512
#: bumped when the quantization recipe changes, so cached INT8 models from an older recipe are not reused
INT8_RECIPE = "v2"
#: the exporter's own recipe per target (bump one when its code changes what it writes)
RECIPES = {"onnx": "v1", "onnx-int8": INT8_RECIPE, "aoti": "v1", "tensorrt": "v1"}
#: distributions whose versions go into every cache key
TOOLCHAIN = ("cifarbench", "torch", "onnx", "onnxscript", "onnxruntime")


def default_calib_data() -> str:
    """Calibration images come from this source unless the caller names one (``--data``)."""
    return os.environ.get("CIFARBENCH_CALIB_DATA", "cifar10")


def cache_root() -> Path:
    from .. import data  # read at call time: tests point data.CACHE_DIR at a temp folder

    return Path(data.CACHE_DIR) / "artifacts"


def toolchain_versions() -> dict[str, str]:
    """The installed versions of :data:`TOOLCHAIN` (``absent`` for one not installed) and the ONNX opset."""
    from importlib.metadata import PackageNotFoundError, version

    from .onnx import OPSET

    out = {}
    for name in TOOLCHAIN:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    out["torch_runtime"] = torch.__version__  # a local build (+cu128, +git...) keeps the same dist version
    out["opset"] = str(OPSET)
    return out


def images_sha256(images: torch.Tensor) -> str:
    """sha256 of a batch of images' shape and values: the identity of a calibration set, by content."""
    h = hashlib.sha256(json.dumps([list(images.shape), str(images.dtype)]).encode())
    h.update(images.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def artifact_recipe(weights_sha256: str, to: str, options: dict) -> dict:
    """Everything that determines a cached artifact's bytes; :func:`artifact_key` is its digest."""
    return {"weights_sha256": weights_sha256, "target": to, "recipe": RECIPES[to],
            "options": dict(sorted(options.items())), "toolchain": toolchain_versions()}


def artifact_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def cached_artifact(model, to: str, **options) -> Path:
    """The artifact for ``model`` from the cache, exporting it the first time (see the module docstring)."""
    from .onnx import model_digest

    check_target(to)
    if to == "tensorrt":
        return _cached_engine(model, **options)
    weights = model_digest(model)
    key_opts: dict = {}
    images = None
    if to == "aoti":
        key_opts = {"device": torch.device(options.get("device", "cpu")).type,
                    "precision": options.get("precision", "fp32")}
    elif to == "onnx-int8":
        from .int8 import calibration_images

        # the images themselves, not the --calib-data string: two data.tar.gz in two folders are two sets
        images = calibration_images(options.get("calib_data") or default_calib_data(),
                                    options.get("calib", DEFAULT_CALIB), options.get("seed", 0),
                                    options.get("data_dir"))
        key_opts = {"calib": len(images), "seed": options.get("seed", 0), "calib_sha256": images_sha256(images)}
    key = artifact_key(artifact_recipe(weights, to, key_opts))
    path = cache_root() / weights[:16] / f"{model.name}.{to}.{key[:24]}{SUFFIXES[to]}"
    if not path.is_file():
        export(model, to=to, out=path, calib_images=images, **options)
    return path


def check_target(to: str) -> None:
    if to not in TARGETS:
        raise UserError(f"unknown export target {to!r}; choose one of {', '.join(TARGETS)}")


def export(model, to: str = "onnx", out: str | Path | None = None, precision: str = "fp32",
           device: str | torch.device = "cpu", calib: int = DEFAULT_CALIB, calib_data: str | None = None,
           data_dir=None, seed: int = 0, max_batch: int | None = None, opt_batch: int | None = None,
           calib_images: torch.Tensor | None = None) -> Path:
    """Write ``model`` (a module, zoo name or checkpoint) as a ``to`` artifact at ``out`` and return the path.

    ``precision``: fp32, or fp16/int8 for TensorRT, fp16/bf16 for AOTInductor on CUDA. ``calib`` training images
    from ``calib_data`` calibrate the INT8 targets (or ``calib_images``, already drawn by the caller).
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

        images = calib_images if calib_images is not None else \
            calibration_images(calib_data or default_calib_data(), calib, seed, data_dir)
        return export_int8(cached_artifact(model, "onnx"), out, images)
    if to == "aoti":
        from .aoti import export_aoti

        return export_aoti(model, out, device=device, precision=precision)
    from .tensorrt import build_engine, make_profile

    images = calib_images
    if precision == "int8" and images is None:
        from .int8 import calibration_images

        images = calibration_images(calib_data or default_calib_data(), calib, seed, data_dir)
    profile = make_profile(**({"max_batch": max_batch} if max_batch else {}), opt_batch=opt_batch)
    return build_engine(cached_artifact(model, "onnx"), out, precision=precision, profile=profile,
                        calib_images=images, cache_dir=cache_root() / "tensorrt")


def _cached_engine(model, precision: str = "fp32", max_batch: int | None = None, opt_batch: int | None = None,
                   **options) -> Path:
    """Engines are cached by (ONNX sha256, TensorRT version, GPU name, precision, profile, and for INT8 the
    calibration images' sha256), plus the toolchain of :func:`toolchain_versions`."""
    from ..checkpoint import file_sha256
    from .tensorrt import _require_tensorrt, engine_cache_key, make_profile

    trt = _require_tensorrt()
    onnx_path = cached_artifact(model, "onnx")
    profile = make_profile(**({"max_batch": max_batch} if max_batch else {}), opt_batch=opt_batch)
    images = None
    if precision == "int8":
        from .int8 import calibration_images

        images = calibration_images(options.get("calib_data") or default_calib_data(),
                                    options.get("calib", DEFAULT_CALIB), options.get("seed", 0),
                                    options.get("data_dir"))
    key = engine_cache_key(file_sha256(onnx_path), trt.__version__, torch.cuda.get_device_name(), precision, profile,
                           calib_sha256=images_sha256(images) if images is not None else None,
                           toolchain=toolchain_versions())
    path = cache_root() / "tensorrt" / f"{model.name}-{key}.engine"
    if not path.is_file():
        options.pop("device", None)
        export(model, to="tensorrt", out=path, precision=precision, max_batch=max_batch, opt_batch=opt_batch,
               calib_images=images, **options)
    return path
