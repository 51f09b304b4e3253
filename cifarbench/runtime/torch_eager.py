"""Torch eager runtime: the reference every other backend is checked against."""
from __future__ import annotations

import copy

import torch

from ..errors import UserError
from ..nets import CifarNet
from .base import Runtime

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The torch dtype of ``precision``; half precisions only where they are fast (CUDA)."""
    if precision not in DTYPES:
        raise UserError(f"precision {precision!r} is not available for torch backends; use fp32, fp16 or bf16")
    if precision != "fp32" and device.type != "cuda":
        raise UserError(f"{precision} torch inference needs a CUDA device (got {device})")
    return DTYPES[precision]


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, model: CifarNet, device: str | torch.device = "cpu", channels_last: bool = True,
                 precision: str = "fp32"):
        self.device = torch.device(device)
        self.precision = precision
        self._dtype = precision_dtype(precision, self.device)
        if self._dtype != torch.float32 or getattr(model, "training", False):
            model = copy.deepcopy(model)  # never change the caller's module behind its back
        self.model = model.eval().to(self.device, self._dtype)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = model.name

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self._dtype)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    @torch.inference_mode()
    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(self._prepare(batch)).float()
