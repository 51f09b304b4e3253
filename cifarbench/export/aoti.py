"""AOTInductor: ``torch.export`` of a torch source's module, compiled ahead of time into a ``.pt2`` package.

The package is built the fast way for inference on the CPU: Inductor ``freezing`` (weights become constants, so
BatchNorm folds into the convs and constant subgraphs fold away) and channels_last (NHWC) weights and input, the
layout oneDNN's convolutions run natively. A channels_last package reads its input as NHWC *without checking the
strides*: fed a plain NCHW tensor it returns wrong logits, so the layout is recorded in the metadata
(``input_layout``) and :class:`~cifarbench.runtime.aoti.AotiRuntime` converts every batch to it. The batch is
dynamic (1..``MAX_BATCH``) unless the source has a fixed one.

A package is compiled for one device type (CPU C++ or CUDA kernels); the device and the cifarbench metadata
(the source's contract: classes, mean/std, input size) are stored in it (``aot_inductor.metadata``) so the runtime
can refuse a package built for another device with a clear message instead of a C++ error.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_path, scratch_dir
from .onnx import as_source, model_metadata

#: largest batch the exported graph accepts (the dynamic dim's upper bound)
MAX_BATCH = 4096
#: Inductor settings of every package (see the module docstring)
INDUCTOR_CONFIGS = {"freezing": True}


def export_aoti(model, out: str | Path, device: str | torch.device = "cpu", precision: str = "fp32",
                channels_last: bool = True) -> Path:
    import copy

    source = as_source(model)
    if source.module is None:
        raise UserError(f"{source.name} is not a torch model; AOTInductor compiles torch modules — export an ONNX "
                        f"model to onnx-int8 or tensorrt instead")
    device = torch.device(device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    module = copy.deepcopy(source.module).eval().to(device, dtype)
    fixed, size = source.fixed_batch, source.input_size
    example = torch.rand(fixed or 8, 3, size, size, device=device, dtype=dtype)
    layout = "channels_last" if channels_last else "contiguous"
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)
    dynamic = None if fixed else ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
    meta = {**model_metadata(source, precision), "device": device.type, "input_layout": layout,
            "max_batch": str(fixed or MAX_BATCH)}
    out = Path(out)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
            # compiled in a pid-named scratch folder beside ``out`` (removed on every exit, swept after a kill -9),
            # then moved into place atomically
            with scratch_dir(out.parent, ".cifarbench-aoti-") as scratch, atomic_path(out) as tmp:
                built = scratch / "model.pt2"
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(built),
                    inductor_configs={**INDUCTOR_CONFIGS,
                                      "aot_inductor.metadata": {f"cifarbench.{k}": v for k, v in meta.items()}})
                os.replace(built, tmp)
    except (UserError, OSError):
        raise
    except Exception as exc:  # torch.export and Inductor raise many types for code they cannot trace or compile
        raise UserError(f"cannot compile {source.name} with AOTInductor: {type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}; use --backend "
                        f"torch or onnxruntime") from None
    return out
