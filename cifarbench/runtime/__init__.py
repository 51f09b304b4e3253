"""Runtimes behind one interface: ``open_runtime(model, backend=...)`` -> :class:`Runtime` with ``.logits(batch)``.

Backends: ``torch`` (eager, channels_last), ``torch-compile`` (Inductor; CUDA graphs on GPU), ``aoti``
(AOTInductor ``.pt2``), ``onnxruntime`` (fp32 ONNX on the CPU, CUDA or TensorRT execution providers),
``onnx-int8`` (statically quantized ONNX on ONNX Runtime) and ``tensorrt`` (native engines). ``auto`` is the
fastest fp32 backend available here: ``tensorrt`` on a GPU with TensorRT, else ``onnxruntime`` where its
provider supports the device (always on CPU), else ``torch``. Exported artifacts for a model are made once and
cached (:func:`cifarbench.export.cached_artifact`); an artifact path opens with its matching backend.
"""
from __future__ import annotations

from pathlib import Path

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
    ok = kind == "cpu" and not sep or kind == "cuda" and (not sep or (index.isdigit() and len(index) < 6))
    if not ok:
        raise UserError(f"unknown device {text!r}; valid here: {', '.join(valid_devices())}")
    device = torch.device(spelled)
    if require_present and device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"--device {text}: no CUDA GPU here; valid here: {', '.join(valid_devices())}")
        if device.index is not None and device.index >= n:
            raise UserError(f"--device {text}: this machine has {n} CUDA device{'s' if n > 1 else ''}; "
                            f"valid here: {', '.join(valid_devices())}")
    return device


def resolve_module(model) -> torch.nn.Module:
    """A torch module from a module, a zoo name or a checkpoint path."""
    from ..zoo import load_model

    if isinstance(model, torch.nn.Module):
        return model.eval()
    if isinstance(model, (str, Path)) and Path(model).suffix in ARTIFACTS:
        raise UserError(f"{model} is an exported artifact; this needs a zoo name or a checkpoint")
    return load_model(model)


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
    """``model``: a torch module, zoo name, checkpoint or exported artifact. ``backend``: see ``--backend``.

    ``precision``: fp32; fp16/bf16 for torch backends on CUDA; fp16/int8 for TensorRT. ``options``: ``calib``
    and ``calib_data`` (INT8 calibration), ``mode`` (torch.compile), ``threads`` (ONNX Runtime), ``max_batch``
    and ``opt_batch`` (TensorRT profile).
    """
    if isinstance(model, Runtime):
        return model
    device = parse_device(device, require_present=False) if device is not None else default_device()
    if isinstance(model, (str, Path)) and Path(model).suffix in ARTIFACTS:
        return _open_artifact(Path(model), resolve_backend(backend, device, Path(model).suffix), device, options)
    backend = resolve_backend(backend, device)
    module = resolve_module(model)
    if backend == "torch":
        return TorchRuntime(module, device=device, precision=precision)
    if backend == "torch-compile":
        from .torch_compile import CompiledRuntime

        return CompiledRuntime(module, device=device, precision=precision, mode=options.get("mode"))
    from ..export import cached_artifact

    calib = {k: options[k] for k in ("calib", "calib_data", "seed", "data_dir") if k in options}
    if backend == "aoti":
        from .aoti import AotiRuntime

        return AotiRuntime(cached_artifact(module, "aoti", device=device, precision=precision), device)
    if backend in ("onnxruntime", "onnx-int8"):
        from .ort import OrtRuntime

        if precision not in ("fp32", "int8"):
            raise UserError(f"{backend} runs fp32 or int8 models, not {precision}")
        to = "onnx-int8" if backend == "onnx-int8" or precision == "int8" else "onnx"
        return OrtRuntime(cached_artifact(module, to, **(calib if to == "onnx-int8" else {})), device,
                          threads=options.get("threads"))
    from .tensorrt import TensorRTRuntime

    profile = {k: options[k] for k in ("max_batch", "opt_batch") if k in options}
    return TensorRTRuntime(cached_artifact(module, "tensorrt", precision=precision, **profile, **calib), device)


def _open_artifact(path: Path, backend: str, device: torch.device, options: dict) -> Runtime:
    if backend == "aoti":
        from .aoti import AotiRuntime

        return AotiRuntime(path, device)
    if backend == "tensorrt" and path.suffix != ".onnx":
        from .tensorrt import TensorRTRuntime

        return TensorRTRuntime(path, device)
    from .ort import OrtRuntime

    if backend == "tensorrt":  # an ONNX file through TensorRT: ONNX Runtime's TensorRT execution provider
        return OrtRuntime(path, device, tensorrt_ep=True)
    rt = OrtRuntime(path, device, threads=options.get("threads"))
    if backend == "onnx-int8" and rt.precision != "int8":
        raise UserError(f"{path} is an {rt.precision} ONNX model; quantize it with "
                        f"`cifarbench export MODEL --to onnx-int8` or use --backend onnxruntime")
    return rt
