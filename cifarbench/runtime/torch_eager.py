"""Torch eager runtime: the reference every other backend is checked against."""
from __future__ import annotations

import torch

from ..nets import CifarNet
from .base import Runtime


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, model: CifarNet, device: str | torch.device = "cpu", channels_last: bool = True):
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = model.name

    @torch.inference_mode()
    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self.model(batch).float()
