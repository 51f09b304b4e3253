"""Torch eager runtime: the reference every other backend is checked against.

Runs ``source.torch_module()``: the model's module, behind the source's normalization when it has ``mean``/``std``,
so it takes [0, 1] pixels like every runtime. Built from a :class:`~cifarbench.source.ModelSource` or anything
:func:`~cifarbench.source.resolve_source` takes (a module, a zoo name, a checkpoint, a TorchScript file, ...).
"""
from __future__ import annotations

import copy
import warnings

import torch

from ..errors import UserError, error_reason
from .base import Runtime

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The torch dtype of ``precision``; half precisions only where they are fast (CUDA)."""
    if precision not in DTYPES:
        raise UserError(f"precision {precision!r} is not available for torch backends; use fp32, fp16 or bf16")
    if precision != "fp32" and device.type != "cuda":
        raise UserError(f"{precision} torch inference needs a CUDA device (got {device})")
    return DTYPES[precision]


def as_source(model, source=None):
    """The :class:`ModelSource` of ``model`` (itself if it is one; ``source`` when the caller resolved it)."""
    from ..source import ModelSource, resolve_source

    if isinstance(model, ModelSource):
        return model
    if source is not None:
        return source
    return resolve_source(model)  # a module is copied there: the caller's is never changed


class TorchRuntime(Runtime):
    name = "torch"
    applies_normalization = False  # torch_module() normalizes inside

    def __init__(self, model, device: str | torch.device = "cpu", channels_last: bool = True,
                 precision: str = "fp32", source=None):
        self.device = torch.device(device)
        self.precision = precision
        self._dtype = precision_dtype(precision, self.device)
        self.source = as_source(model, source)
        module = self.source.torch_module()
        if self._dtype != torch.float32:
            module = copy.deepcopy(module)  # a half-precision copy; the source's module stays float32 for others
        self.model = _moved(module.eval(), self.device, self._dtype)
        self.fixed_batch = self.source.fixed_batch
        self.channels_last = channels_last
        if channels_last:
            self.model = _moved(self.model, memory_format=torch.channels_last)

    def torch_module(self):
        return self.model

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self._dtype)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            try:
                return self._forward(batch)
            except RuntimeError:
                # a model written for contiguous maps (``x.view(x.size(0), -1)`` after a conv) cannot take
                # channels-last ones: from now on it runs as written (its weights converted outside inference
                # mode, so they stay ordinary tensors); an error of its own is raised again below
                self.channels_last = False
                self.model = _moved(self.model, memory_format=torch.contiguous_format)
            except Exception as exc:  # noqa: BLE001  (TorchScript's errors are not RuntimeErrors)
                raise self._failed(exc, batch) from None
        try:
            return self._forward(batch)
        except Exception as exc:  # noqa: BLE001  (the model's own code failed: the user's to fix, in one line)
            raise self._failed(exc, batch) from None

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(self._prepare(batch)).float()

    def _failed(self, exc: Exception, batch: torch.Tensor) -> UserError:
        return UserError(f"{self.source.name} failed on a batch of {tuple(batch.shape)}: "
                         f"{type(exc).__name__}: {error_reason(exc)}")


def _moved(module, *args, **kwargs):
    """``module.to(*args, **kwargs)``, without the warning torch gives for a TorchScript module's parameters
    (it reads their ``.grad``, which says nothing to a cifarbench user)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*grad attribute of a Tensor that is not a leaf.*")
        return module.to(*args, **kwargs)
