"""Artifacts: make and cache exported files, and open a runtime for any model source.

Layering (imports run downward only; the loader/runner split of Polygraphy)::

    artifacts   open_runtime: resolve the source once, choose a backend, get its artifact from the cache
    runtime/    open a module or a file and run it (never imports export)
    export/     write a source as ONNX / INT8 ONNX / AOTInductor / TensorRT (never imports runtime)
    formats     what both read: ONNX graphs, the TensorRT engine container
    source      what the user gave, resolved once (module or graph, input contract, digest)

``cifarbench.runtime.open_runtime`` is a call-time delegate to :func:`open_runtime` here, kept so existing callers
work; importing :mod:`cifarbench.runtime` or :mod:`cifarbench.export` never imports this module.

:func:`cached_artifact` keys each file by everything that determines its bytes (:func:`artifact_recipe`): the
source's content digest (``source.digest``), its contract as written into the metadata (classes, mean/std, input
size), the target and its options, the calibration images' own bytes for INT8, the exporter's recipe version and
the versions of cifarbench, torch, onnx (and opset), onnxscript and onnxruntime. So ``--backend onnxruntime`` on
a model exports once and every later run reuses it, while other weights, another contract, other calibration
images (even under the same file name) or an upgraded library get a new one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import UserError
from .export import DEFAULT_CALIB, DEFAULT_CALIB_METHOD, RECIPES, SUFFIXES, check_calib_method, check_target, images_sha256
from .io import file_sha256, write_text

#: distributions whose versions go into every cache key
TOOLCHAIN = ("cifarbench", "torch", "onnx", "onnxscript", "onnxruntime")
#: the source options open_runtime/cached_artifact pass to resolve_source
CONTRACT = ("arch", "arch_kw", "mean", "std", "classes", "input_size")
#: :func:`open_runtime`'s options besides the contract: INT8 calibration, ONNX Runtime's threads, torch.compile's
#: mode, TensorRT's profile
RUNTIME_OPTIONS = ("calib", "calib_data", "seed", "data_dir", "threads", "mode", "max_batch", "opt_batch")
#: backends that compile a torch module themselves, and with what: neither takes a TorchScript module
COMPILING = {"torch-compile": "torch.compile", "aoti": "torch.export (and so AOTInductor)"}
#: what a misspelt option most likely meant
_MEANT = {"label": "target", "targets": "target", "cls": "target", "class_": "target", "size": "input_size",
          "normalize": "mean/std"}


def check_options(options: dict, allowed, where: str, also=()) -> None:
    """A keyword no one reads would be dropped silently (``label="dog"`` instead of ``target="dog"`` gave a map
    of the predicted class): refuse it as Python refuses an unknown keyword argument, with the likeliest meant
    one among ``allowed`` and the function's named parameters ``also``."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        import difflib

        known = [*allowed, *also]

        def meant(name):
            return _MEANT.get(name) or next(iter(difflib.get_close_matches(name, known, n=1)), None)

        hints = "; ".join(f"{u}: did you mean {meant(u)}?" for u in unknown if meant(u))
        raise TypeError(f"{where}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}"
                        + (f" ({hints})" if hints else "") + f"; its options are {', '.join(sorted(allowed))}")
#: sources whose module the ONNX exporter is not trusted to trace: ``auto`` runs them on torch
TORCH_FIRST = ("torchscript", "exported-program")


def cache_root() -> Path:
    from . import data  # read at call time: tests point data.CACHE_DIR at a temp folder

    return Path(data.CACHE_DIR) / "artifacts"


def toolchain_versions() -> dict[str, str]:
    """The installed versions of :data:`TOOLCHAIN` (``absent`` for one not installed) and the ONNX opset."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from .export.onnx import OPSET

    out = {}
    for name in TOOLCHAIN:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    out["torch_runtime"] = torch.__version__  # a local build (+cu128, +git...) keeps the same dist version
    out["opset"] = str(OPSET)
    return out


def artifact_recipe(weights_sha256: str, to: str, options: dict) -> dict:
    """Everything that determines a cached artifact's bytes; :func:`artifact_key` is its digest."""
    return {"weights_sha256": weights_sha256, "target": to, "recipe": RECIPES[to],
            "options": dict(sorted(options.items())), "toolchain": toolchain_versions()}


def artifact_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _source(model, options: dict):
    from .source import resolve_source

    contract = {k: options.pop(k) for k in CONTRACT if k in options}
    return resolve_source(model, **{k: v for k, v in contract.items() if v is not None})


def cached_artifact(model, to: str, **options) -> Path:
    """The ``to`` artifact of ``model`` (a :class:`~cifarbench.source.ModelSource` or anything resolve_source
    takes; ``arch``/``mean``/... in ``options`` go to it) from the cache, exported the first time (see the module
    docstring). ``options``: ``device``/``precision`` (aoti, tensorrt), ``calib``/``calib_data``/``seed``/
    ``data_dir`` (INT8), ``calib_method``/``quantize_head`` (onnx-int8), ``max_batch``/``opt_batch`` (tensorrt)."""
    import torch

    from .export import calibration_set, export

    check_target(to)
    source = _source(model, options)
    precision = options.get("precision", "fp32")
    key_opts: dict = {"contract": {"classes": list(source.classes), "input_size": source.input_size,
                                   "mean": source.mean, "std": source.std, "fixed_batch": source.fixed_batch}}
    images = None
    int8 = to == "onnx-int8" or (to == "tensorrt" and precision == "int8")
    if int8:
        # the images themselves, not the --calib-data string: two data.tar.gz in two folders are two sets
        images = calibration_set(source, options.get("calib", DEFAULT_CALIB), options.get("calib_data"),
                                 options.get("seed", 0), options.get("data_dir"))
        key_opts.update(calib=len(images), seed=options.get("seed", 0), calib_sha256=images_sha256(images))
    if to == "onnx-int8":
        int8_opts = {"calib_method": options.get("calib_method", DEFAULT_CALIB_METHOD),
                     "quantize_head": bool(options.get("quantize_head", False))}
        check_calib_method(int8_opts["calib_method"])
        key_opts.update(int8_opts)
    if to in ("aoti", "tensorrt"):
        key_opts.update(device=torch.device(options.get("device", "cpu")).type, precision=precision)
    onnx_path = None
    if to == "tensorrt" or (to == "onnx-int8" and source.kind != "onnx"):
        onnx_path = cached_artifact(source, "onnx")  # one fp32 export serves every graph target
    if to == "tensorrt":
        from .export.tensorrt import make_profile
        from .formats import require_tensorrt

        trt = require_tensorrt()
        profile = make_profile(**({"max_batch": options["max_batch"]} if options.get("max_batch") else {}),
                               opt_batch=options.get("opt_batch"), input_size=source.input_size)
        key_opts.update(trt=trt.__version__, gpu=torch.cuda.get_device_name(), profile=list(profile.shapes()),
                        device="cuda")
    key = artifact_key(artifact_recipe(source.digest, to, key_opts))
    path = cache_root() / source.digest[:16] / f"{_safe(source.name)}.{to}.{key[:24]}{SUFFIXES[to]}"
    if not _intact(path, to):
        opts = {k: v for k, v in options.items() if k in ("precision", "device", "max_batch", "opt_batch")}
        if to != "aoti":
            opts.pop("device", None)
        if to == "onnx-int8":
            opts.update(int8_opts)
        export(source, to=to, out=path, calib_images=images, onnx_path=onnx_path, **opts)
        write_text(_stamp(path), file_sha256(path) + "\n")
    return path


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _intact(path: Path, to: str) -> bool:
    """Whether the cached ``path`` is the file cifarbench wrote: its sha256, recorded when it was exported,
    still matches. A truncated, edited or half-copied artifact is rebuilt with one warning (one without a record,
    from an older cifarbench or a run killed between the two writes, silently)."""
    if not path.is_file():
        return False
    try:
        recorded = _stamp(path).read_text().strip()
    except OSError:
        return False
    if recorded == file_sha256(path):
        return True
    from .errors import warn

    warn(f"the cached {to} artifact {path} is damaged or was changed since it was made; rebuilding it")
    return False


def _safe(name: str) -> str:
    from .export import _safe as safe

    return safe(name)


# ---------------------------------------------------------------------------------------------- open_runtime

def choose_backend(source, backend: str | None, device) -> str:
    """The concrete backend for ``source`` on ``device`` (``backend`` may be ``auto``); a backend that cannot run
    this kind of source is one :class:`UserError` naming those that can."""
    from .runtime import BACKENDS, resolve_backend

    backend = backend or "auto"
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if source.kind == "onnx":
        allowed = ("onnxruntime", "onnx-int8", "tensorrt")
    elif source.kind == "aoti":
        allowed = ("aoti",)
    elif source.kind == "tensorrt":
        allowed = ("tensorrt",)
    else:
        allowed = None
    if source.kind == "torchscript" and backend in COMPILING:
        raise UserError(f"{source.name} is a TorchScript module, which {COMPILING[backend]} cannot compile; use "
                        f"torch, onnxruntime, onnx-int8 or tensorrt")
    if allowed is not None:
        if backend == "auto":
            if source.kind == "onnx" and device.type == "cuda":
                return resolve_backend("auto", device)  # tensorrt, onnxruntime on CUDA, or torch (refused below)
            return allowed[0]
        if backend not in allowed:
            what = {"onnx": "an ONNX model", "aoti": "an AOTInductor package", "tensorrt": "a TensorRT engine"}
            raise UserError(f"{source.name} is {what[source.kind]}; it runs with --backend "
                            f"{' or '.join(allowed)}, not {backend}")
        return backend
    if backend == "auto" and source.kind in TORCH_FIRST:
        return "torch"
    return resolve_backend(backend, device)


def open_runtime(model, backend: str | None = "auto", device=None, precision: str = "fp32", **options):
    """A :class:`~cifarbench.runtime.Runtime` for ``model``: a :class:`~cifarbench.source.ModelSource` or anything
    :func:`~cifarbench.source.resolve_source` takes (zoo name, checkpoint, ``nn.Module``, TorchScript, ``.pt2``,
    state_dict with ``arch=``, ONNX file), resolved once here; or a TensorRT engine file; a Runtime passes through.

    ``backend``: ``auto`` (see :func:`cifarbench.runtime.resolve_backend`; TorchScript and ExportedProgram sources
    run on torch; a torch module whose ONNX export fails falls back to torch with a warning), ``torch``,
    ``torch-compile``, ``aoti``, ``onnxruntime``, ``onnx-int8``, ``tensorrt``. A torch source runs on any of them
    (graph backends through its cached export); an ONNX source on ``onnxruntime``, ``onnx-int8`` (an fp32 file is
    quantized, calibrated on ``calib_data`` images normalized through the contract) or ``tensorrt``.
    ``precision``: fp32; fp16/bf16 for torch backends on CUDA; fp16/int8 for TensorRT. ``options``: the contract
    for resolve_source (``arch``, ``arch_kw``, ``mean``, ``std``, ``classes``, ``input_size``), ``calib``,
    ``calib_data``, ``seed``, ``data_dir`` (INT8 calibration), ``mode`` (torch.compile), ``threads`` (ONNX
    Runtime), ``max_batch`` and ``opt_batch`` (TensorRT profile).
    """
    from .runtime import Runtime, default_device, parse_device

    check_options(options, CONTRACT + RUNTIME_OPTIONS, "open_runtime")
    if isinstance(model, Runtime):
        return model
    device = parse_device(device, require_present=False) if device is not None else default_device()
    if isinstance(model, (str, Path)) and Path(model).suffix.lower() in (".engine", ".plan"):
        from .runtime.tensorrt import TensorRTRuntime

        if (backend or "auto") not in ("auto", "tensorrt"):
            raise UserError(f"{model} is a TensorRT engine; it runs with --backend tensorrt, not {backend}")
        return TensorRTRuntime(model, device)
    options = dict(options)
    source = _source(model, options)
    chosen = choose_backend(source, backend, device)
    try:
        return _open(source, chosen, device, precision, options)
    except UserError as exc:
        if (backend or "auto") != "auto" or chosen not in ("onnxruntime", "tensorrt") or source.module is None \
                or not str(exc).startswith(f"cannot export {source.name}"):
            raise
        from .errors import warn

        # auto never fails where torch would run
        warn(f"{str(exc).removesuffix('; use --backend torch')}; running it on torch instead")
        return _open(source, "torch", device, precision, options)


def _open(source, backend: str, device, precision: str, options: dict):
    calib = {k: options[k] for k in ("calib", "calib_data", "seed", "data_dir") if k in options}
    if backend == "torch":
        from .runtime import TorchRuntime

        return TorchRuntime(source, device=device, precision=precision)
    if backend == "torch-compile":
        from .runtime.torch_compile import CompiledRuntime

        return CompiledRuntime(source, device=device, precision=precision, mode=options.get("mode"))
    if backend == "aoti":
        from .runtime.aoti import AotiRuntime

        path = source.path if source.kind == "aoti" else \
            cached_artifact(source, "aoti", device=device, precision=precision)
        return AotiRuntime(path, device, source=source)
    if backend in ("onnxruntime", "onnx-int8"):
        from .formats import graph_precision, load_onnx
        from .runtime.ort import OrtRuntime

        if precision not in ("fp32", "int8"):
            raise UserError(f"{backend} runs fp32 or int8 models, not {precision}")
        to = "onnx-int8" if backend == "onnx-int8" or precision == "int8" else "onnx"
        if source.kind == "onnx":
            path = source.onnx_path
            if to == "onnx-int8" and graph_precision(load_onnx(path)) != "int8":
                path = cached_artifact(source, "onnx-int8", **calib)  # quantize the user's own graph
        else:
            path = cached_artifact(source, to, **calib)
        return OrtRuntime(path, device, threads=options.get("threads"), source=source)
    from .runtime.tensorrt import TensorRTRuntime

    profile = {k: options[k] for k in ("max_batch", "opt_batch") if k in options}
    return TensorRTRuntime(cached_artifact(source, "tensorrt", precision=precision, **profile, **calib), device,
                           source=source)


def int8_accuracy_report(model, int8_path: str | Path, data: str, data_dir=None, limit: int | None = None,
                         batch: int = 500, progress=None) -> dict:
    """Test accuracy of the fp32 ONNX model and of its int8 copy on the first ``limit`` test images of ``data`` (a
    data source for ``load_split``, or its test split already loaded).
    ``progress(done, total)``: image evaluations so far, of ``2 * images`` (each image runs on both models)."""
    import torch

    from .data import load_split
    from .runtime.ort import OrtRuntime
    from .source import resolve_source

    source = resolve_source(model)
    fp32_path = source.onnx_path if source.kind == "onnx" else cached_artifact(source, "onnx")
    test = data if hasattr(data, "subset") else load_split(data, "test", data_dir)
    if limit:
        test = test.subset(slice(0, limit))
    preds, done = {}, 0
    for key, rt in (("fp32", OrtRuntime(fp32_path, source=source)), ("int8", OrtRuntime(int8_path, source=source))):
        chunks = []
        for i in range(0, len(test), batch):
            chunks.append(rt.logits(test.subset(slice(i, i + batch)).float_images()).argmax(1))
            done += len(chunks[-1])
            if progress is not None:
                progress(done, 2 * len(test))
        preds[key] = torch.cat(chunks)
    acc = {k: (p == test.labels).double().mean().item() for k, p in preds.items()}
    return {"images": len(test), "fp32": acc["fp32"], "int8": acc["int8"], "drop": acc["fp32"] - acc["int8"],
            "top1_agreement": (preds["fp32"] == preds["int8"]).double().mean().item()}


__all__ = ["open_runtime", "check_options", "cached_artifact", "choose_backend", "artifact_recipe", "artifact_key",
           "toolchain_versions", "cache_root", "int8_accuracy_report"]
