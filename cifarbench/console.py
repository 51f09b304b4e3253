"""Where output goes: JSON results alone on stdout, progress bars and tables on stderr."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

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


#: where :func:`emit_json` writes while :func:`json_stdout` holds stdout aside (None: ``sys.stdout``)
_json_out = None


def emit_json(obj) -> None:
    out = _json_out or sys.stdout
    out.write(to_json(obj) + "\n")
    out.flush()


@contextmanager
def json_stdout(enabled: bool = True):
    """Keep stdout for the one JSON document of a ``--json`` run: while the command runs, anything else written
    to stdout goes to stderr, a user's model that prints (``print()`` in a TorchScript or eager forward) or a
    library writing to its C-level stdout included, and :func:`emit_json` writes to the real stdout kept aside.
    Python's ``sys.stdout`` is swapped for every caller; file descriptor 1 is pointed at stderr only when
    ``sys.stdout`` is it (the console script, not an in-process caller capturing output)."""
    global _json_out
    if not enabled or _json_out is not None:
        yield
        return
    previous = sys.stdout
    try:
        on_fd1 = previous.fileno() == 1
    except (AttributeError, OSError, ValueError):  # a capture object standing in for stdout
        on_fd1 = False
    previous.flush()
    saved = out = None
    try:
        if on_fd1:
            saved = os.dup(1)
            out = open(saved, "w", closefd=False, encoding=previous.encoding, errors=previous.errors)
            os.dup2(2, 1)  # fd 1 now writes to stderr; the real stdout lives on as ``saved``
        _json_out, sys.stdout = out or previous, sys.stderr
        yield
    finally:
        sys.stdout, _json_out = previous, None
        if out is not None:
            out.close()
        if saved is not None:
            previous.flush()  # what a C library left in Python's buffer goes to stderr, as it was meant to
            os.dup2(saved, 1)
            os.close(saved)


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
