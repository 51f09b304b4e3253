"""The one interface every analysis runs through.

A :class:`Runtime` takes a float [N, 3, S, S] batch of pixels in [0, 1] (S: ``runtime.input_size``, the model's
own; a torch tensor on any device, moved as needed) and returns float32 logits [N, C] (C: ``num_classes``) on
``runtime.device``. The source's input contract is applied here, once, for every backend: its normalization
(:meth:`ModelSource.normalize <cifarbench.source.ModelSource.normalize>`, for backends that run the model's own
graph; torch backends run ``source.torch_module()``, which normalizes inside) and its fixed batch (a graph that
takes exactly B images gets exactly B per call: the last chunk is padded with copies and the padded rows
dropped).

Capabilities, asked instead of testing a runtime's type: :meth:`Runtime.torch_module` (an eval ``nn.Module`` on
[0, 1] pixels, or None), :meth:`Runtime.onnx_path` (the ONNX file it runs, or None) and
:meth:`Runtime.onnx_graph` (the ``onnx.ModelProto`` it runs, or None; it takes the model's own input).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

#: the most input pixels one forward of ``Runtime.logits`` takes (4096 CIFAR images: bench's largest GPU batch
#: runs whole); a larger batch, or a model without a fixed or maximum batch, runs in chunks of this size
LOGITS_PIXELS = 4096 * 32 * 32


class Runtime(ABC):
    #: backend name as given to ``--backend`` (``torch``, ``onnxruntime``, ...)
    name: str = ""
    #: ``fp32``, ``fp16``, ``bf16`` or ``int8``
    precision: str = "fp32"
    device: torch.device = torch.device("cpu")
    #: largest batch one call may take (an engine profile's max); larger batches are split by :meth:`logits`
    max_batch: int | None = None
    #: the only batch size the model takes (a fixed-batch graph), else None
    fixed_batch: int | None = None
    #: the :class:`~cifarbench.source.ModelSource` this runtime runs: its input contract and provenance
    source = None
    #: True where the backend runs the model's own graph, so :meth:`logits` applies ``source.normalize``
    applies_normalization: bool = True

    @property
    def input_size(self) -> int:
        """S of the square [N, 3, S, S] images it takes."""
        return self.source.input_size

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def classes(self) -> tuple[str, ...]:
        return self.source.classes

    @property
    def net(self) -> str:
        """The model's name (a zoo net's ``net1``..``net4``)."""
        return self.source.name

    def torch_module(self):
        """An eval-mode ``nn.Module`` taking [0, 1] pixels (normalization inside), or None."""
        return None

    def onnx_path(self):
        """The :class:`~pathlib.Path` of the ONNX file this runtime runs, or None."""
        return None

    def onnx_graph(self):
        """The ``onnx.ModelProto`` this runtime runs (its input is the model's own: normalized where the source
        has ``mean``/``std``), or None."""
        return None

    @abstractmethod
    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for a prepared batch (normalized where needed, exactly ``fixed_batch`` images where set, at most
        ``max_batch``), already on the right device and contiguous."""

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        from ..errors import UserError

        if not isinstance(batch, torch.Tensor):
            raise UserError(f"expected a torch.Tensor batch, got {type(batch).__name__}")
        size = self.input_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise UserError(f"expected a [N, 3, {size}, {size}] batch ({self.net} takes {size}x{size} images), "
                            f"got {tuple(batch.shape)}")
        if not batch.is_floating_point():
            raise UserError(f"expected float images in [0, 1], got {batch.dtype} (convert with "
                            f"Dataset.float_images() or .float() / 255)")
        if len(batch) == 0:
            return torch.empty(0, self.num_classes, device=self.device)
        batch = batch.detach()
        if batch.device.type == "cpu":
            # the contract is pixels in [0, 1]: a 0..255 batch would run, and give logits of saturated images.
            # Checked where it costs nothing (one pass on the host, ~0.1 % of a forward); on a GPU it would be a
            # device sync per call, inside bench's timings: there the caller's entry point checks (occlusion_maps)
            low, high = torch.aminmax(batch)
            low, high = float(low), float(high)
            if not (0.0 <= low and high <= 1.0):
                raise UserError(f"expected pixels in [0, 1], got values from {low:g} to {high:g}" +
                                (" (0..255 images: divide by 255)" if high > 1.0 else ""))
        # at most LOGITS_PIXELS of input per forward: a 200,000-image batch (or an expand()ed view of one image)
        # runs in bounded memory, each chunk moved, normalized and made contiguous on its own
        step = self.fixed_batch or self.max_batch or max(1, LOGITS_PIXELS // (size * size))
        if len(batch) <= step and not (self.fixed_batch and len(batch) < self.fixed_batch):
            return self._run(self._contract_batch(batch))
        out = torch.empty(len(batch), self.num_classes, device=self.device)
        for i in range(0, len(batch), step):
            out[i:i + step] = self._chunk(self._contract_batch(batch[i:i + step]))
        return out

    def _contract_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """A chunk as ``_run`` takes it: on the device, float32, normalized, contiguous, never the caller's storage."""
        given = batch
        batch = batch.to(self.device, torch.float32)
        if self.applies_normalization:
            batch = self.source.normalize(batch)
        batch = batch.contiguous()
        # a model that normalizes in place (x.sub_(mean)) must not write into the caller's images
        return batch.clone() if batch.data_ptr() == given.data_ptr() else batch

    def _chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        n = self.fixed_batch
        if n and len(chunk) < n:  # pad with copies of the last image; its rows are dropped again
            padded = torch.cat([chunk, chunk[-1:].expand(n - len(chunk), -1, -1, -1)]).contiguous()
            return self._run(padded)[:len(chunk)]
        return self._run(chunk)

    def probs(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(batch), dim=1)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.net} {self.name} {self.precision} on {self.device}>"
