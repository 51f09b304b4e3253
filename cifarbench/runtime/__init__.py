"""Runtimes behind one interface: ``open_runtime(model, backend=...)`` -> :class:`Runtime` with ``.logits(batch)``."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .base import Runtime
from .torch_eager import TorchRuntime

__all__ = ["Runtime", "TorchRuntime", "open_runtime", "resolve_module", "default_device"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_module(model) -> torch.nn.Module:
    """A torch module from a module, a zoo name or a checkpoint path."""
    from ..zoo import load_model

    if isinstance(model, torch.nn.Module):
        return model.eval()
    return load_model(model)


def open_runtime(model, backend: str | None = "auto", device: str | torch.device | None = None) -> Runtime:
    """``model``: a torch module, zoo name, checkpoint or exported artifact. ``backend``: see ``--backend``."""
    if isinstance(model, Runtime):
        return model
    device = torch.device(device) if device is not None else default_device()
    backend = backend or "auto"
    if isinstance(model, (str, Path)) and Path(model).suffix in (".onnx", ".pt2", ".engine", ".plan"):
        raise UserError(f"cannot open artifact {model}: exported runtimes are not available in this build")
    if backend not in ("auto", "torch"):
        raise UserError(f"unknown or unavailable backend {backend!r}; available: auto, torch")
    return TorchRuntime(resolve_module(model), device=device)
