"""AOTInductor: ``torch.export`` with a dynamic batch, compiled ahead of time into a ``.pt2`` package.

A package is compiled for one device type (CPU C++ or CUDA kernels); the device and the cifarbench metadata are
stored in the package (``aot_inductor.metadata``) so :class:`~cifarbench.runtime.aoti.AotiRuntime` can refuse a
package built for another device with a clear message instead of a C++ error.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch

from ..io import atomic_path, scratch_dir
from .onnx import model_metadata

#: largest batch the exported graph accepts (the dynamic dim's upper bound)
MAX_BATCH = 4096


def export_aoti(model, out: str | Path, device: str | torch.device = "cpu", precision: str = "fp32") -> Path:
    import copy

    device = torch.device(device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = copy.deepcopy(model).eval().to(device, dtype)
    example = torch.rand(8, 3, 32, 32, device=device, dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    meta = {**model_metadata(model, precision), "device": device.type, "max_batch": str(MAX_BATCH)}
    out = Path(out)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        # the package is compiled in a pid-named scratch folder beside ``out`` (removed on every exit, swept after a
        # kill -9), then moved into place atomically
        with scratch_dir(out.parent, ".cifarbench-aoti-") as scratch, atomic_path(out) as tmp:
            built = scratch / "model.pt2"
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(built),
                inductor_configs={"aot_inductor.metadata": {f"cifarbench.{k}": v for k, v in meta.items()}})
            os.replace(built, tmp)
    return out
