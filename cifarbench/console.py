"""Where output goes: JSON results alone on stdout, progress bars and tables on stderr."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .io import to_json

console = Console(stderr=True)


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
