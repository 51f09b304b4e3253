"""``cifarbench train``: one run of the seed or fast recipe, resumable."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..options import DataDirOpt, DeviceOpt, JsonOpt, OutOpt, SetOpt, parse_sets

# Every setting defaults to None here so a resumed run can tell what the user gave (which must agree with the
# saved run) from what they left out (taken from the saved run); TrainConfig fills a new run's defaults.
_RESUME_NOTE = "With --resume: the saved run's; giving another value is an error."
#: what a run writes into its folder (cifarbench.train)
RUN_FILES = ("config.json", "metrics.csv", "best.safetensors", "last.safetensors", "last.state.pt", "results.json")


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        net: Annotated[str, typer.Argument(help="net1 | net2 | net3 | net4")],
        epochs: Annotated[Optional[int], typer.Option(
            "--epochs", help="Default: the recipe's. With --resume: the saved run's, or more to extend it.")] = None,
        lr: Annotated[Optional[float], typer.Option("--lr", help=f"Peak learning rate. {_RESUME_NOTE}")] = None,
        batch_size: Annotated[Optional[int], typer.Option("--batch-size", help=_RESUME_NOTE)] = None,
        sets: SetOpt = None,
        recipe: Annotated[Optional[str], typer.Option(
            "--recipe", help=f"seed (the report's, default) | fast. {_RESUME_NOTE}")] = None,
        data: Annotated[Optional[str], typer.Option(
            "--data", help="cifar10 (official, via torchvision), synthetic[:N], or PATH (official folder, "
                           "image-folder root or its .tar.gz). Default: $CIFARBENCH_DATA when set, else cifar10. "
                           "With --resume: the saved run's (its identity is checked).")] = None,
        data_dir: DataDirOpt = None,
        out: OutOpt = None,
        resume: Annotated[Optional[Path], typer.Option(
            "--resume", help="Run folder to continue from its last finished epoch, with all its saved settings.")]
        = None,
        seed: Annotated[Optional[int], typer.Option(
            "--seed", help=f"Random seed (default 0; recorded with the results). {_RESUME_NOTE}")] = None,
        device: DeviceOpt = None,
        json: JsonOpt = False,
    ) -> None:
        """Train a net; writes config.json, metrics.csv, best/last checkpoints and results.json to --out.

        Examples: cifarbench train net1 --epochs 15 --data train.tar.gz --out runs/net1;
        cifarbench train net4 --recipe fast --device cuda; cifarbench train net1 --resume runs/net1 --epochs 30
        """
        from ..console import console, emit_json
        from ..errors import UserError
        from ..train import TrainConfig, resume_config, train

        given = {k: v for k, v in dict(recipe=recipe, lr=lr, batch_size=batch_size, epochs=epochs, data=data,
                                       seed=seed).items() if v is not None}
        hparams = parse_sets(sets)
        data_dir = str(data_dir) if data_dir else None
        if resume is not None:
            if out is not None and Path(out) != Path(resume):
                raise UserError("--resume and --out name different folders; --resume continues in place")
            out = resume
            config = resume_config(resume, net, hparams=hparams, data_dir=data_dir, device=device, **given)
        else:
            config = TrainConfig(net=net, hparams=hparams, data_dir=data_dir, device=device, **given)
            config.resolved()  # validate before touching any folder
            out = out or Path("runs") / f"{net}-{config.recipe}-s{config.seed}"
            if (Path(out) / "config.json").exists():
                raise UserError(f"{out} already holds a run; use --resume {out} or another --out")
        from .. import cli
        from ..io import output_folder

        # the run's folder is guarded: a user's file named like a run file is refused before training, and every
        # file written is logged in its manifest. A resumed run's files were checked as a cifarbench run above
        # (config.json, checkpoint metadata), so they are adopted as ours, manifest or not
        with output_folder(out, RUN_FILES, adopt=RUN_FILES if resume is not None else ()):
            summary = train(config, out, resume=resume is not None, command_line=cli.COMMAND_LINE)
        if json:
            emit_json(summary)
        else:
            console.print(f"[bold]{net}[/] best test accuracy {summary['best_test_accuracy']:.2%} at epoch "
                          f"{summary['best_epoch']} of {summary['epochs']} ({summary['train_seconds']:.0f} s "
                          f"training); run saved in {out}")
