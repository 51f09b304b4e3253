"""Option groups shared by every command, defined once (as Polygraphy does) so help and defaults agree."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

#: said wherever a command takes MODEL: a .pt2 is native code, unlike checkpoints (safetensors, weights-only
#: torch.load) and ONNX files, which are data
PT2_WARNING = ("Security: an AOTInductor .pt2 package is a shared library, and opening one runs its code; "
               "open only .pt2 files you built or trust.")
ModelArg = Annotated[str, typer.Argument(help="Zoo name (net1..net4, bundled weights), checkpoint "
                                               "(.safetensors or run dir) or exported artifact (.onnx, .pt2, .engine). "
                                               + PT2_WARNING, show_default=False)]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Zoo name, checkpoint or exported artifact (.onnx, .pt2, "
                                                             ".engine). " + PT2_WARNING)]
BackendOpt = Annotated[str, typer.Option(
    "--backend", "-b",
    help="Runtime: auto | torch | torch-compile | aoti | onnxruntime | onnx-int8 | tensorrt (auto: fastest here).")]


def _check_device(value: Optional[str]) -> Optional[str]:
    """``--device`` is checked while parsing, before any work: a bad name or a missing GPU is one error line."""
    if value is None:
        return None
    from .runtime import parse_device  # torch is imported only when --device is given

    return str(parse_device(value))


DeviceOpt = Annotated[Optional[str], typer.Option("--device", callback=_check_device,
                                                  help="cpu, cuda or cuda:N; default: cuda when present.")]
DataOpt = Annotated[str, typer.Option(
    "--data", help="cifar10 (official, via torchvision), synthetic[:N], or PATH (official folder, image-folder "
                   "root or its .tar.gz).")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Where torchvision keeps CIFAR-10.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder for CSV, NPY and PNG files.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (recorded with the results).")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Hyper-parameter override key=value (l1_oc, filter_multiplier, kernel_size, stride, dropout); "
                  "repeatable.")]


def parse_sets(items: list[str] | None) -> dict:
    """``["l1_oc=32", "dropout=0.5"]`` -> ``{"l1_oc": "32", "dropout": "0.5"}``; values are checked by the zoo."""
    from .errors import UserError

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"--set {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out
