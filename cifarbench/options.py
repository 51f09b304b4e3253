"""Option groups shared by every command, defined once (as Polygraphy does) so help and defaults agree."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import UserError

#: said wherever a command takes MODEL: a .pt2 is native code, unlike checkpoints (safetensors, weights-only
#: torch.load) and ONNX files, which are data
PT2_WARNING = ("Security: an AOTInductor .pt2 package is a shared library, and opening one runs its code; "
               "open only .pt2 files you built or trust.")
MODEL_HELP = ("Zoo name (net1..net4, bundled weights), cifarbench checkpoint (.safetensors or run dir), any ONNX "
              "file, TorchScript file, torch.export or AOTInductor .pt2, TensorRT .engine, or a state_dict "
              "(.pt/.pth/.safetensors) with --arch. ")
ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP + PT2_WARNING, show_default=False)]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP + PT2_WARNING)]

# ---- the model option group: every command that takes MODEL takes these, and resolves it once (model_source)
_GROUP = "Model input contract"
ArchOpt = Annotated[Optional[str], typer.Option(
    "--arch", help="For a state_dict: PKG.MODULE:FACTORY (or path/to/file.py:FACTORY), a callable that builds the "
                   "model. Security: this imports and runs that Python code.", rich_help_panel=_GROUP,
    show_default=False)]
ArchKwOpt = Annotated[Optional[list[str]], typer.Option(
    "--arch-kw", help="Keyword argument for --arch's factory, key=value (repeatable), e.g. num_classes=10.",
    rich_help_panel=_GROUP, show_default=False)]
MeanOpt = Annotated[Optional[str], typer.Option(
    "--mean", help="R,G,B the model subtracts from [0, 1] pixels (e.g. ImageNet's 0.485,0.456,0.406); with --std. "
                   "Default: from cifarbench metadata, else none.", rich_help_panel=_GROUP, show_default=False)]
StdOpt = Annotated[Optional[str], typer.Option(
    "--std", help="R,G,B the model divides by (e.g. 0.229,0.224,0.225); with --mean.", rich_help_panel=_GROUP,
    show_default=False)]
ClassesOpt = Annotated[Optional[str], typer.Option(
    "--classes", help="Class names in output order, a,b,c or a file with one name per line (default: metadata, "
                      "else CIFAR-10's for 10 outputs). Labels are matched to them by name.",
    rich_help_panel=_GROUP, show_default=False)]
InputSizeOpt = Annotated[Optional[int], typer.Option(
    "--input-size", help="Side S of the square images a torch model takes (default: read from the model, else 32).",
    rich_help_panel=_GROUP, show_default=False)]


def model_source(model, arch=None, arch_kw=None, mean=None, std=None, classes=None, input_size=None):
    """The :class:`cifarbench.source.ModelSource` for a command's MODEL and its model options: resolved once, at
    the command's boundary; everything after takes the source, never the string."""
    from .source import resolve_source

    return resolve_source(model, arch=arch, arch_kw=arch_kw or None, mean=mean, std=std, classes=classes,
                          input_size=input_size)


def load_test_split(source, data, data_dir=None):
    """The test split of ``data`` for ``source``: labels matched to its class names, checked to fit it
    (:func:`check_data`). Where the class folders are not the model's because the model names no classes of its
    own (``class0..`` or CIFAR-10's names for 10 outputs, when --classes was not given), the error says so."""
    from .data import UnknownClasses, load_split
    from .errors import UserError
    from .source import default_classes

    try:
        dataset = load_split(data, "test", data_dir, classes=source.classes)
    except UnknownClasses as exc:
        n, message = source.num_classes, str(exc)
        if tuple(source.classes) == default_classes(n):
            raise UserError(f"{message}; the model does not name its classes: give --classes with its {n} class "
                            f"names in output order (e.g. --classes "
                            f"{','.join(f'name{i}' for i in range(min(n, 3)))}{',...' if n > 3 else ''})") from None
        raise
    check_data(source, dataset)
    return dataset


def check_data(source, dataset) -> None:
    """The data fits the model: as many classes (the labels were matched by name in ``load_split``) and images of
    the model's input size; one error line otherwise."""
    from .errors import UserError

    if len(dataset.classes) != source.num_classes:
        raise UserError(f"{source.name} outputs {source.num_classes} classes but the data has "
                        f"{len(dataset.classes)}; give --classes with {source.num_classes} names")
    size = tuple(dataset.images.shape[-2:])
    if len(dataset) and size != (source.input_size, source.input_size):
        raise UserError(f"{source.name} takes {source.input_size}x{source.input_size} images but the data's are "
                        f"{size[0]}x{size[1]}; use data of that size (or --input-size for a torch model that takes "
                        f"{size[0]}x{size[1]})")
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
    "--data", envvar="CIFARBENCH_DATA", show_envvar=True,
    help="cifar10 (official, via torchvision), synthetic[:N], or PATH (official folder, image-folder root or its "
         ".tar.gz). Default: $CIFARBENCH_DATA when set, else cifar10.")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Where torchvision keeps CIFAR-10.")]
def _check_out(value: Optional[str]) -> Optional[Path]:
    """``--out ""`` would be Path(""), the current folder, which the user did not name; refused while parsing."""
    if value is None:
        return None
    if not value.strip():
        raise UserError("--out is empty; give a folder (. for the current one)")
    return Path(value)


# parsed as text, so an empty value is still seen as empty (a Path would already be "."); commands get a Path
OutOpt = Annotated[Optional[str], typer.Option("--out", "-o", callback=_check_out,
                                               help="Output folder for CSV, NPY and PNG files.")]
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


# ---- where a dataset-scale analysis runs (ablate --sweep, mine): cifarbench.distributed.run_sharded
_DIST = "Executor (sharded, resumable)"
ExecutorOpt = Annotated[str, typer.Option(
    "--executor", help="local (this process) | ray (shards as Ray tasks; pip install 'cifarbench[ray]').",
    rich_help_panel=_DIST)]
AddressOpt = Annotated[Optional[str], typer.Option(
    "--address", help="Ray cluster (HOST:PORT, ray://HOST:PORT or auto); default: start a local Ray.",
    rich_help_panel=_DIST, show_default=False)]
CpusPerTaskOpt = Annotated[float, typer.Option("--cpus-per-task", help="CPUs each Ray task asks for.",
                                               rich_help_panel=_DIST)]
GpusPerTaskOpt = Annotated[float, typer.Option("--gpus-per-task", help="GPUs each Ray task asks for.",
                                               rich_help_panel=_DIST)]
RayCpusOpt = Annotated[Optional[int], typer.Option(
    "--ray-cpus", help="CPUs of the local Ray started without --address (default: all).", rich_help_panel=_DIST,
    show_default=False)]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Keep the shards already finished under --out/shards and compute only the rest (runs the "
                     "analysis in shards, also with --executor local).", rich_help_panel=_DIST)]


def sharded(executor: str, resume: bool) -> bool:
    """Whether a command runs its analysis through cifarbench.distributed.run_sharded: on Ray, or to resume."""
    return executor != "local" or resume


def sharding_plan(executor: str, address, cpus_per_task, gpus_per_task, ray_cpus, resume: bool, out, model,
                  contract: dict) -> dict | None:
    """What ``ablate``/``mine`` hand to run_sharded, or None when they run unsharded here. The executor is
    checked before any model or data is opened; ``--resume`` needs the ``--out`` that holds the shards."""
    from .errors import UserError

    if not sharded(executor, resume):
        return None
    from .distributed import check_executor

    check_executor(executor, address, cpus_per_task, gpus_per_task)
    if resume and out is None:
        raise UserError("--resume needs --out (the folder that holds the finished shards)")
    return {"executor": executor, "address": address, "cpus_per_task": cpus_per_task,
            "gpus_per_task": gpus_per_task, "ray_cpus": ray_cpus, "resume": resume, "model": model,
            "model_options": contract}


def shard_progress(what: str):
    """(progress context, callback for run_sharded's Progress): shards done, images/s and ETA on stderr."""
    from .console import progress

    bar = progress()
    task = bar.add_task(what, total=None, status="")

    def update(p) -> None:
        rate = f", {p.images_per_s:.0f} images/s" if p.images_per_s else ""
        skipped = f" ({p.skipped} resumed)" if p.skipped else ""
        bar.update(task, completed=p.images_done, total=p.images_total,
                   status=f"{p.done}/{p.total} shards{skipped}{rate}")

    return bar, update
