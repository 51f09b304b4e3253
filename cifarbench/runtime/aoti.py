"""AOTInductor runtime: a ``.pt2`` package (see :mod:`cifarbench.export.aoti`), loaded without Python tracing or
recompilation. The package runs the model's own module, so the source's normalization is applied before it, and a
package compiled for channels_last input (``input_layout`` in its metadata) gets every batch in that layout: it
reads the strides it was compiled for without checking them."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .base import Runtime


class AotiRuntime(Runtime):
    name = "aoti"

    def __init__(self, path: str | Path, device: str | torch.device | None = None, source=None):
        from ..source import resolve_source

        path = Path(path)
        if not path.is_file():
            raise UserError(f"no such AOTInductor package: {path}")
        # the package's own contract (fixed batch read from its generated code, metadata); ``source`` (the torch
        # source it was compiled from) overrides classes and normalization
        own = resolve_source(path)
        try:
            self.package = torch._inductor.aoti_load_package(str(path))
            raw = self.package.get_metadata()
        except Exception as exc:  # a bad zip, a missing .so, an ABI mismatch: the package is unusable here
            raise UserError(f"corrupt or incompatible AOTInductor package {path}: "
                            f"{str(exc).strip().splitlines()[0][:200]}") from None
        self.source = source if source is not None else own
        self.path = path
        self.metadata = {k.removeprefix("cifarbench."): v for k, v in raw.items() if k.startswith("cifarbench.")}
        built_for = torch.device(self.metadata.get("device", "cpu"))
        if device is not None and torch.device(device).type != built_for.type:
            raise UserError(f"{path} was compiled for {built_for.type}, not {torch.device(device).type}; "
                            f"re-export it with --device {torch.device(device).type}")
        self.device = torch.device(device) if device is not None else built_for
        self.precision = self.metadata.get("precision", "fp32")
        self._dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
        self.fixed_batch = own.fixed_batch
        self.max_batch = int(self.metadata.get("max_batch", 0)) or None
        self._channels_last = self.metadata.get("input_layout") == "channels_last"

    @torch.inference_mode()
    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self._dtype)
        if self._channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self.package(batch).float()
