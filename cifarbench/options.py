"""Option groups shared by every command, defined once (as Polygraphy does) so help and defaults agree."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelArg = Annotated[str, typer.Argument(help="Zoo name (net1..net4, bundled weights), checkpoint "
                                               "(.safetensors or run dir) or exported artifact (.onnx, .pt2, .engine).",
                                         show_default=False)]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Zoo name, checkpoint or exported artifact.")]
BackendOpt = Annotated[str, typer.Option(
    "--backend", "-b",
    help="Runtime: auto | torch | torch-compile | aoti | onnxruntime | onnx-int8 | tensorrt (auto: fastest here).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu or cuda[:N]; default: cuda when present.")]
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
