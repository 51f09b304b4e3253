"""``cifarbench train``: one run of the seed or fast recipe, resumable."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..options import DataDirOpt, DataOpt, DeviceOpt, JsonOpt, OutOpt, SeedOpt, SetOpt, parse_sets


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        net: Annotated[str, typer.Argument(help="net1 | net2 | net3 | net4")],
        epochs: Annotated[Optional[int], typer.Option("--epochs", help="Default: the recipe's.")] = None,
        lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.")] = None,
        batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
        sets: SetOpt = None,
        recipe: Annotated[str, typer.Option("--recipe", help="seed (the report's) | fast")] = "seed",
        data: DataOpt = "cifar10",
        data_dir: DataDirOpt = None,
        out: OutOpt = None,
        resume: Annotated[Optional[Path], typer.Option("--resume", help="Run folder to continue from its last "
                                                                           "checkpoint.")] = None,
        seed: SeedOpt = 0,
        device: DeviceOpt = None,
        json: JsonOpt = False,
    ) -> None:
        """Train a net; writes config.json, metrics.csv, best/last checkpoints and results.json to --out."""
        from ..console import console, emit_json
        from ..errors import UserError
        from ..train import TrainConfig, train

        config = TrainConfig(net=net, recipe=recipe, hparams=parse_sets(sets), epochs=epochs, lr=lr,
                             batch_size=batch_size, data=data, data_dir=str(data_dir) if data_dir else None,
                             seed=seed, device=device)
        config.resolved()  # validate before touching any folder
        if resume is not None:
            if out is not None and Path(out) != Path(resume):
                raise UserError("--resume and --out name different folders; --resume continues in place")
            out = resume
        else:
            out = out or Path("runs") / f"{net}-{recipe}-s{seed}"
            if (Path(out) / "config.json").exists():
                raise UserError(f"{out} already holds a run; use --resume {out} or another --out")
        summary = train(config, out, resume=resume is not None)
        if json:
            emit_json(summary)
        else:
            console.print(f"[bold]{net}[/] best test accuracy {summary['best_test_accuracy']:.2%} at epoch "
                          f"{summary['best_epoch']} of {summary['epochs']} ({summary['train_seconds']:.0f} s "
                          f"training); run saved in {out}")
