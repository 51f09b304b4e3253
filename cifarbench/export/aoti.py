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


def _finite(bound, default: int) -> int:
    """A range bound as an int; ``default`` for an unbounded one (sympy's ``oo`` / torch's ``int_oo``)."""
    try:
        return int(bound)
    except Exception:  # int(int_oo) raises AttributeError, int(oo) TypeError
        return default


def batch_range(module) -> tuple[int, int]:
    """The batch sizes the package may take: 1..:data:`MAX_BATCH`, narrowed to a ``torch.export`` program's own
    range where ``module`` runs one (a ``.pt2`` exported with ``Dim("N", max=1024)`` takes at most 1024: exporting
    it again with a wider range violates its constraints)."""
    low, high = 1, MAX_BATCH
    for m in module.modules():
        ranges = getattr(m, "range_constraints", None)
        if not isinstance(ranges, dict) or not hasattr(m, "graph"):
            continue
        node = next((n for n in m.graph.nodes if n.op == "placeholder"), None)
        val = node.meta.get("val") if node is not None else None
        if not isinstance(val, torch.Tensor) or val.ndim < 1 or not isinstance(val.shape[0], torch.SymInt):
            continue
        bounds = ranges.get(val.shape[0].node.expr)
        if bounds is None:
            continue
        low = max(low, _finite(bounds.lower, low))
        high = min(high, _finite(bounds.upper, high))
    if low > high:
        raise UserError(f"the exported program takes batches of {low}..{high} images; cifarbench's AOTInductor "
                        f"packages take 1..{MAX_BATCH}")
    return low, high


def export_aoti(model, out: str | Path, device: str | torch.device = "cpu", precision: str = "fp32",
                channels_last: bool = True) -> Path:
    import copy

    source = as_source(model)
    if source.module is None:
        raise UserError(f"{source.name} is not a torch model; AOTInductor compiles torch modules — export an ONNX "
                        f"model to onnx-int8 or tensorrt instead")
    if source.kind == "torchscript" or any(isinstance(m, torch.jit.ScriptModule) for m in source.module.modules()):
        raise UserError(f"{source.name} is a TorchScript module, which torch.export (and so AOTInductor) cannot "
                        f"compile; use --backend torch or onnxruntime")
    device = torch.device(device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    module = copy.deepcopy(source.module).eval().to(device, dtype)
    fixed, size = source.fixed_batch, source.input_size
    low, high = (1, MAX_BATCH) if fixed else batch_range(source.module)
    example = torch.rand(fixed or min(max(8, low), high), 3, size, size, device=device, dtype=dtype)
    layout = "channels_last" if channels_last else "contiguous"
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)
    dynamic = None if fixed else ({0: torch.export.Dim("batch", min=low, max=high)},)
    meta = {**model_metadata(source, precision), "device": device.type, "input_layout": layout,
            "max_batch": str(fixed or high)}
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
