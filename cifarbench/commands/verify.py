"""``cifarbench verify``: every backend against torch fp32 on the same real images; exit 1 when out of tolerance."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..options import DataDirOpt, DataOpt, DeviceOpt, JsonOpt, ModelArg


def register(app: typer.Typer) -> None:
    @app.command("verify")
    def verify_cmd(
        model: ModelArg,
        backends: Annotated[Optional[str], typer.Option(
            "--backends", help="Comma list of backend[:precision], e.g. onnxruntime,onnx-int8,tensorrt:fp16 "
                               "(default: every backend available here).")] = None,
        data: DataOpt = "cifar10",
        data_dir: DataDirOpt = None,
        images: Annotated[int, typer.Option("--images", help="Test images to compare on.")] = 1000,
        calib: Annotated[int, typer.Option("--calib", help="Training images for INT8 calibration.")] = 512,
        device: DeviceOpt = None,
        json: JsonOpt = False,
    ) -> None:
        """Per backend: max/mean abs and rel error of logits and probabilities, top-1 agreement, pass/fail."""
        import itertools

        import torch

        from ..console import console, emit_json, progress
        from ..data import load_split
        from ..errors import UserError
        from ..parity import default_backends, parse_backends, verify
        from ..runtime import default_device

        if images < 1:
            raise UserError(f"--images must be at least 1, got {images}")
        dev = torch.device(device) if device else default_device()
        specs = parse_backends(backends) if backends else default_backends(dev)
        test = load_split(data, "test", data_dir)
        batch = test.subset(slice(0, images)).float_images()
        with progress() as bar:
            done = itertools.count()  # backends finished before the one starting now
            task = bar.add_task("verify", total=len(specs), status="")
            report = verify(model, specs, batch, dev, calib=calib, calib_data=data,
                            step=lambda label: bar.update(task, completed=next(done), status=label))
            bar.update(task, completed=len(specs), status="done")
        if json:
            emit_json(report)
        else:
            from rich.table import Table

            table = Table(title=f"{report['net']}: parity against {report['reference']} on {report['images']} images")
            for col in ("backend", "precision", "device", "logits max abs", "logits max rel", "probs max abs",
                        "probs mean abs", "top-1 agree", "result"):
                table.add_column(col)
            for r in report["results"]:
                verdict = "[green]pass[/]" if r["passed"] else f"[red]FAIL[/] {'; '.join(r['failures'])}"
                table.add_row(r["backend"], r["precision"], r["device"], f"{r['logits_max_abs']:.2e}",
                              f"{r['logits_max_rel']:.2e}", f"{r['probs_max_abs']:.2e}", f"{r['probs_mean_abs']:.2e}",
                              f"{r['top1_agreement']:.2%}", verdict)
            console.print(table)
        if not report["passed"]:
            raise typer.Exit(1)
