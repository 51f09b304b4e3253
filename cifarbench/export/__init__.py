"""Export any model source to ONNX, INT8 ONNX, AOTInductor or TensorRT: ``export(model, to=..., out=...)``.

``model`` is anything :func:`cifarbench.source.resolve_source` takes (a :class:`~cifarbench.source.ModelSource`
passes through). From a torch source (zoo net, checkpoint, module, state_dict + arch, TorchScript, ExportedProgram)
every target is made from its module; from an ONNX source, ``onnx`` copies the graph with cifarbench's metadata,
``onnx-int8`` quantizes the file itself and ``tensorrt`` builds an engine from it (AOTInductor needs a torch
module). Artifacts take the model's own input and carry its contract (classes, mean/std, input size) in their
metadata; INT8 calibration images are [0, 1] pixels normalized through that contract.

This layer only writes files. Caching artifacts under a content key and choosing a backend live one layer up, in
:mod:`cifarbench.artifacts`; export never imports :mod:`cifarbench.runtime` (nor the other way round).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import UserError

TARGETS = ("onnx", "onnx-int8", "aoti", "tensorrt")
SUFFIXES = {"onnx": ".onnx", "onnx-int8": ".onnx", "aoti": ".pt2", "tensorrt": ".engine"}
DEFAULT_CALIB = 512
#: ``--calib-method`` names (the first is the default) and ONNX Runtime's ``CalibrationMethod`` member for each
CALIB_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
DEFAULT_CALIB_METHOD = next(iter(CALIB_METHODS))
#: bumped when the quantization recipe changes, so cached INT8 models from an older recipe are not reused
INT8_RECIPE = "v3"
#: the exporter's own recipe per target (bump one when its code changes what it writes)
RECIPES = {"onnx": "v2", "onnx-int8": INT8_RECIPE, "aoti": "v2", "tensorrt": "v2"}


def default_calib_data() -> str:
    """Calibration images come from this source unless the caller names one (``--calib-data``/``--data``)."""
    return os.environ.get("CIFARBENCH_CALIB_DATA", "cifar10")


def images_sha256(images) -> str:
    """sha256 of a batch of images' shape and values: the identity of a calibration set, by content."""
    h = hashlib.sha256(json.dumps([list(images.shape), str(images.dtype)]).encode())
    h.update(images.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def check_target(to: str) -> None:
    if to not in TARGETS:
        raise UserError(f"unknown export target {to!r}; choose one of {', '.join(TARGETS)}")


def check_calib_method(method: str) -> None:
    if method not in CALIB_METHODS:
        raise UserError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIB_METHODS)}")


def uses_bundled_calibration(source, calib_data: str | None = None) -> bool:
    """No calibration data named (neither ``calib_data`` nor ``$CIFARBENCH_CALIB_DATA``) and a CIFAR-10 32x32
    model (a zoo net, or any model with CIFAR-10's ten classes at 32x32): calibrate on the bundled set, offline."""
    from ..data import CLASSES

    if calib_data or os.environ.get("CIFARBENCH_CALIB_DATA", "").strip():
        return False
    return getattr(source, "kind", None) == "zoo" or (
        getattr(source, "input_size", None) == 32 and tuple(getattr(source, "classes", ())) == CLASSES)


def calibration_set(source, calib: int = DEFAULT_CALIB, calib_data: str | None = None, seed: int = 0,
                    data_dir=None):
    """``calib`` [0, 1] training images of the source's size from ``calib_data`` (a seeded subset). Without
    ``calib_data`` a CIFAR-10 32x32 model calibrates on the bundled set (:func:`cifarbench.data.bundled_calibration`,
    250 class-balanced training images: at most that many are used), every other model on
    ``$CIFARBENCH_CALIB_DATA``, else ``cifar10``."""
    from .int8 import calibration_images

    if uses_bundled_calibration(source, calib_data):
        import torch

        from ..data import bundled_calibration

        if calib < 1:
            raise UserError(f"--calib must be at least 1, got {calib}")
        bundled = bundled_calibration(classes=source.classes)
        index = torch.randperm(len(bundled), generator=torch.Generator().manual_seed(seed))[:calib]
        images = bundled.subset(index).float_images()
    else:
        images = calibration_images(calib_data or default_calib_data(), calib, seed, data_dir)
    if tuple(images.shape[1:]) != source.input_shape:
        raise UserError(f"calibration images are {list(images.shape[1:])} but {source.name} takes "
                        f"{list(source.input_shape)}; give --calib-data with {source.input_size}x{source.input_size} "
                        f"images")
    return images


def export(model, to: str = "onnx", out: str | Path | None = None, precision: str = "fp32",
           device="cpu", calib: int = DEFAULT_CALIB, calib_data: str | None = None,
           data_dir=None, seed: int = 0, max_batch: int | None = None, opt_batch: int | None = None,
           calib_images=None, onnx_path: str | Path | None = None, calib_method: str = DEFAULT_CALIB_METHOD,
           quantize_head: bool = False, progress=None, **contract) -> Path:
    """Write ``model`` as a ``to`` artifact at ``out`` and return the path.

    ``precision``: fp32, or fp16/int8 for TensorRT, fp16/bf16 for AOTInductor on CUDA. ``calib`` training images
    from ``calib_data`` calibrate the INT8 targets (or ``calib_images``: [0, 1] pixels already drawn by the
    caller; the contract's normalization is applied here). ``onnx_path``: an fp32 ONNX export of the same source
    to build a TensorRT engine or INT8 model from (the artifacts cache passes its own). ``onnx-int8`` only:
    ``calib_method`` (a key of :data:`CALIB_METHODS`), ``quantize_head`` (int8 hidden FC layers, the logits layer
    stays fp32; see :mod:`cifarbench.export.int8`) and ``progress(done, total)`` (calibration images run).
    ``contract``: ``arch``, ``arch_kw``, ``mean``, ``std``, ``classes``, ``input_size`` for
    :func:`~cifarbench.source.resolve_source`.
    """
    from .onnx import as_source

    check_target(to)
    check_calib_method(calib_method)
    source = as_source(model, **contract)
    out = Path(out) if out else Path(f"{_safe(source.name)}{'-int8' if to == 'onnx-int8' else ''}{SUFFIXES[to]}")
    if to == "onnx":
        from .onnx import export_onnx

        return export_onnx(source, out)
    if to in ("onnx-int8", "tensorrt") and (to == "onnx-int8" or precision == "int8") and calib_images is None:
        calib_images = calibration_set(source, calib, calib_data, seed, data_dir)
    if to == "onnx-int8":
        from .int8 import export_int8

        return export_int8(_onnx_of(source, onnx_path), out, source.normalize(calib_images), source,
                           calibrate_method=calib_method, keep_head=not quantize_head, progress=progress)
    if to == "aoti":
        from .aoti import export_aoti

        return export_aoti(source, out, device=device, precision=precision)
    from .tensorrt import build_engine, make_profile

    profile = make_profile(**({"max_batch": max_batch} if max_batch else {}), opt_batch=opt_batch,
                           input_size=source.input_size)
    if source.fixed_batch:
        profile = make_profile(max_batch=source.fixed_batch, opt_batch=source.fixed_batch,
                               min_batch=source.fixed_batch, input_size=source.input_size)
    from .onnx import model_metadata

    images = source.normalize(calib_images) if calib_images is not None else None
    return build_engine(_onnx_of(source, onnx_path), out, precision=precision, profile=profile,
                        calib_images=images, cache_dir=out.parent, meta=model_metadata(source, precision))


def _onnx_of(source, onnx_path):
    """The fp32 graph to quantize or compile: ``onnx_path`` if given, an ONNX source's own file, else a fresh
    export (in memory)."""
    if onnx_path is not None:
        return Path(onnx_path)
    if source.kind == "onnx":
        return source.onnx_path
    from .onnx import to_onnx_proto

    return to_onnx_proto(source)


def _safe(name: str) -> str:
    """A file-name-safe form of a model's name."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


# Compatibility: ``cifarbench.export.cached_artifact`` (and the cache-key helpers) moved up to
# :mod:`cifarbench.artifacts`, the layer that caches artifacts. Callers not yet moved still find them here; the
# import happens on first use only, so importing export never imports artifacts (or runtime).
_MOVED = ("cached_artifact", "artifact_recipe", "artifact_key", "toolchain_versions", "cache_root", "TOOLCHAIN")


def __getattr__(name):
    if name in _MOVED:
        from .. import artifacts

        return getattr(artifacts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
