"""Where output goes: JSON results alone on stdout, progress bars and tables on stderr."""
from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .io import to_json

#: a table written to a file or a pipe (``cifarbench bench --from run.json > report.txt``, ``2> log``) is
#: printed whole: rich would otherwise cut it to 80 columns ("ima…") since a file has no width. ``COLUMNS``
#: still wins when set, as for any terminal program.
WIDE = 4096


def make_console(stderr: bool = True, **kwargs) -> Console:
    """A rich console that fits the terminal when it is one, and never cuts lines when it is a file or pipe."""
    probe = Console(stderr=stderr, **kwargs)
    if not probe.is_terminal and "width" not in kwargs and not os.environ.get("COLUMNS"):
        return Console(stderr=stderr, width=WIDE, **kwargs)
    return probe


console = make_console(stderr=True)


def emit_json(obj) -> None:
    sys.stdout.write(to_json(obj) + "\n")
    sys.stdout.flush()


def progress(**kwargs) -> Progress:
    """A rich progress bar on stderr, off when stderr is not a terminal; each task passes ``status=`` (live text
    such as the loss) to ``add_task``/``update``."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False, disable=not console.is_terminal, **kwargs,
    )


def quiet_cuda_probe() -> None:
    """torch.compile and AOTInductor import ``torch.utils.cpp_extension``, whose CUDA_HOME probe logs "No CUDA
    runtime is found, using CUDA_HOME=..." (a logging record, not a Python warning) on a machine whose torch has
    CUDA builds but no GPU: meaningless for a CPU run, and it would be the only line above a table. Drop that
    one message from that one logger; everything else it logs still shows. ``cli.main`` calls it for every
    command (stdlib logging only: no torch import)."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(getattr(f, "__name__", "") == "_no_cuda_runtime" for f in logger.filters):
        logger.addFilter(_no_cuda_runtime)


def _no_cuda_runtime(record) -> bool:
    return not str(record.msg).startswith("No CUDA runtime is found")
