"""Native TensorRT runtime: a cifarbench engine file run with ``execute_async_v3`` on torch's CUDA stream.

Inputs and outputs are torch CUDA tensors whose addresses are handed to the execution context, so nothing
crosses to the host. Batches above the engine profile's max are split by :meth:`Runtime.logits`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..formats import check_compatible, require_tensorrt, unpack_engine
from .base import Runtime


class TensorRTRuntime(Runtime):
    name = "tensorrt"

    def __init__(self, path: str | Path, device: str | torch.device | None = None, source=None):
        from ..source import file_digest, source_from_contract

        path = Path(path)
        if not path.is_file():
            raise UserError(f"no such TensorRT engine: {path}")
        header, blob = unpack_engine(path.read_bytes(), str(path))
        meta = header.get("meta", {})
        profile = header.get("profile", {})
        size = int(meta.get("input_size") or profile.get("input_size") or 32)
        fixed = profile["max_batch"] if profile.get("min_batch") == profile.get("max_batch") else None
        self.source = source if source is not None else source_from_contract(
            "tensorrt", meta.get("net") or path.stem, input_size=size, num_classes=int(meta.get("num_classes", 10)),
            metadata=meta, path=path, fixed_batch=fixed, digest=file_digest(path),
            provenance={"path": str(path), "format": "TensorRT engine", "runs_code": True,
                        "executes": "a TensorRT engine (native kernels) on the GPU"})
        trt = require_tensorrt()
        self.device = torch.device(device or "cuda")
        if self.device.type != "cuda":
            raise UserError(f"TensorRT engines run on CUDA devices only, not {self.device}")
        check_compatible(header, trt.__version__, torch.cuda.get_device_name(self.device), str(path))
        self.header = header
        self.metadata = meta
        self.precision = header["precision"]
        self.max_batch = header["profile"]["max_batch"]
        self._min_batch = header["profile"]["min_batch"]
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(blob)
            if self.engine is None:
                raise UserError(f"TensorRT could not deserialize {path} (corrupt or built by another TensorRT)")
            self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = header["input"], header["output"]

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        if len(batch) < self._min_batch:
            raise UserError(f"batch {len(batch)} is below this engine's minimum {self._min_batch}")
        ctx = self.context
        ctx.set_input_shape(self.input_name, tuple(batch.shape))
        out = torch.empty(tuple(ctx.get_tensor_shape(self.output_name)), device=self.device, dtype=torch.float32)
        ctx.set_tensor_address(self.input_name, batch.data_ptr())
        ctx.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out
