"""The one interface every analysis runs through.

A :class:`Runtime` takes a float32 [N, 3, 32, 32] batch in [0, 1] (a torch tensor on any device; it is moved as
needed) and returns float32 logits [N, 10] as a torch tensor on ``runtime.device``. Backends register a factory in
:data:`BACKENDS`; :func:`cifarbench.runtime.open_runtime` picks one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Runtime(ABC):
    #: backend name as given to ``--backend`` (``torch``, ``onnxruntime``, ...)
    name: str = ""
    #: ``fp32``, ``fp16``, ``bf16`` or ``int8``
    precision: str = "fp32"
    device: torch.device = torch.device("cpu")
    #: largest batch one call may take (an engine profile's max); larger batches are split by :meth:`logits`
    max_batch: int | None = None
    #: zoo name of the net behind this runtime (``net1``..``net4``)
    net: str = ""
    #: side S of the square images it takes ([N, 3, S, S]) and the number of classes it scores
    input_size: int = 32
    num_classes: int = 10

    @abstractmethod
    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for a batch no larger than ``max_batch``, already on the right device and contiguous."""

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        from ..errors import UserError

        if not isinstance(batch, torch.Tensor):
            raise UserError(f"expected a torch.Tensor batch, got {type(batch).__name__}")
        size = self.input_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise UserError(f"expected a [N, 3, {size}, {size}] batch, got {tuple(batch.shape)}")
        if not batch.is_floating_point():
            raise UserError(f"expected float images in [0, 1], got {batch.dtype} (convert with "
                            f"Dataset.float_images() or .float() / 255)")
        if len(batch) == 0:
            return torch.empty(0, self.num_classes, device=self.device)
        batch = batch.to(self.device, torch.float32).contiguous()
        step = self.max_batch or len(batch)
        if len(batch) <= step:
            return self._run(batch)
        return torch.cat([self._run(batch[i:i + step]) for i in range(0, len(batch), step)])

    def probs(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(batch), dim=1)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.net} {self.name} {self.precision} on {self.device}>"
