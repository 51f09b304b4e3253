"""Runtimes behind one interface (:class:`Runtime`: ``.logits(batch)`` on [0, 1] pixels, ``.source``, capabilities).

This package only opens modules and files: ``torch`` (eager, channels_last), ``torch-compile`` (Inductor; CUDA
graphs on GPU), ``aoti`` (AOTInductor ``.pt2``), ``onnxruntime`` (ONNX on the CPU, CUDA or TensorRT execution
providers), ``onnx-int8`` (a quantized ONNX graph on ONNX Runtime) and ``tensorrt`` (native engines). It never
imports :mod:`cifarbench.export`; making and caching artifacts, and choosing a backend for a model, is
:mod:`cifarbench.artifacts` (``open_runtime`` here delegates to it at call time).

``auto`` (:func:`resolve_backend`) is the fastest fp32 backend available here: ``tensorrt`` on a GPU with
TensorRT, else ``onnxruntime`` where its provider supports the device (always on CPU), else ``torch``. It does
not pick ``aoti`` on the CPU, because ONNX Runtime is faster there. net4, 625 images, 2 threads, the three
runtimes in turn, 3 rounds (2026-12-01, shared 2-core "Intel Xeon Processor" VM, load 2.4-2.7): eager torch
6.8/7.2/7.8 s, AOTInductor as ``export --to aoti`` builds it (freezing: BN folded; channels_last) 5.8/5.4/7.1 s,
ONNX Runtime 5.3/5.5/4.4 s. The AOTInductor recipe used before (no freezing, NCHW) was no faster than eager
(9.4 vs 8.7 s best of 3 in an earlier, noisier run; the issue's EPYC Zen 4 run: 4.62 vs 4.68 s, ONNX Runtime
2.70 s). Use ``--backend aoti`` for a Python-free deployable artifact rather than for speed on the CPU.
"""
from __future__ import annotations


import torch

from ..errors import UserError
from .base import Runtime
from .torch_eager import TorchRuntime

__all__ = ["Runtime", "TorchRuntime", "BACKENDS", "open_runtime", "resolve_module", "resolve_backend",
           "default_device", "parse_device"]

BACKENDS = ("auto", "torch", "torch-compile", "aoti", "onnxruntime", "onnx-int8", "tensorrt")
#: artifact suffix -> the backends that can open it (first: the default)
ARTIFACTS = {".onnx": ("onnxruntime", "onnx-int8", "tensorrt"), ".pt2": ("aoti",), ".engine": ("tensorrt",),
             ".plan": ("tensorrt",)}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def valid_devices() -> list[str]:
    """The device names this machine accepts: ``cpu``, then ``cuda`` and ``cuda:0..N-1`` where CUDA is present."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(n)] if n else [])


def parse_device(text, require_present: bool = True) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a :class:`torch.device`; anything else (``tpu``, ``cuda:x``, ``cuda:7`` on
    a machine without it) is one :class:`UserError` listing what is valid here. ``require_present=False`` checks the
    spelling only (the API may name a CUDA device on a machine without one and get the backend's own error)."""
    if isinstance(text, torch.device):
        text = str(text)
    spelled = str(text).strip().lower()
    kind, sep, index = spelled.partition(":")
    ok = kind == "cpu" and (not sep or index == "0") or \
        kind == "cuda" and (not sep or (index.isdigit() and len(index) < 6))
    if not ok:
        raise UserError(f"unknown device {text!r}; valid here: {', '.join(valid_devices())}")
    device = torch.device("cpu" if kind == "cpu" else spelled)  # cpu:0 is torch's name of the one CPU device
    if require_present and device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"--device {text}: no CUDA GPU here; valid here: {', '.join(valid_devices())}")
        if device.index is not None and device.index >= n:
            raise UserError(f"--device {text}: this machine has {n} CUDA device{'s' if n > 1 else ''}; "
                            f"valid here: {', '.join(valid_devices())}")
    return device


def resolve_module(model) -> torch.nn.Module:
    """An eval torch module taking [0, 1] pixels from a module, a :class:`~cifarbench.source.ModelSource` or
    anything :func:`~cifarbench.source.resolve_source` takes (``source.torch_module()``); a source without one (an
    ONNX file, an AOTInductor package) is one :class:`UserError`."""
    from ..source import resolve_source

    if isinstance(model, Runtime):
        module = model.torch_module()
        if module is None:
            raise UserError(f"the {model.name} runtime of {model.net} has no torch module; use --backend torch")
        return module
    # a module too goes through its source, which runs a copy: the caller's module keeps its mode and device
    return resolve_source(model).torch_module()


def _tensorrt_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


def resolve_backend(backend: str | None, device: torch.device, artifact: str | None = None) -> str:
    """The concrete backend for ``backend`` (maybe ``auto``) on ``device``, for a model or an artifact suffix."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if artifact is not None:
        allowed = ARTIFACTS[artifact]
        if backend == "auto":
            return allowed[0]
        if backend not in allowed:
            raise UserError(f"a {artifact} artifact runs with --backend {' or '.join(allowed)}, not {backend}")
        return backend
    if backend != "auto":
        return backend
    if device.type == "cpu":
        return "onnxruntime"
    if device.type == "cuda" and _tensorrt_available():
        return "tensorrt"
    from .ort import available_providers

    return "onnxruntime" if "CUDAExecutionProvider" in available_providers() else "torch"


def open_runtime(model, backend: str | None = "auto", device: str | torch.device | None = None,
                 precision: str = "fp32", **options) -> Runtime:
    """See :func:`cifarbench.artifacts.open_runtime`, which this calls.

    The backend choice needs artifacts (a torch model runs on ONNX Runtime through its cached ONNX export), and
    making artifacts is the artifacts layer's job, one layer above this package: so the name stays here for the
    callers that import it from :mod:`cifarbench.runtime`, and the import of :mod:`cifarbench.artifacts` happens
    at call time. Importing this package never imports artifacts or export; new code imports
    ``cifarbench.artifacts.open_runtime`` (or ``cifarbench.open_runtime``)."""
    from ..artifacts import open_runtime as _open_runtime

    return _open_runtime(model, backend, device, precision, **options)
