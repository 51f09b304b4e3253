"""Figures drawn by a helper process forked at a cold start, so matplotlib loads while the parent loads torch.

Why: ``cifarbench occlude --k 8 img.png`` spends most of its wall time importing libraries, and the two big ones
are independent: torch (~1.4 s on a quiet 2-core Xeon) for the maps, matplotlib (~0.45 s, plus ~0.1 s for its
first text and colorbar draw) for the figure. A process forked *before* torch is imported imports matplotlib,
draws a throw-away figure to load fonts, and then waits for the figure jobs; the parent sends each one as soon as
its maps exist and goes on writing the other outputs. Only the figure step leaves the critical path, nothing
else changes: the same functions with the same arguments write the same files (atomically, as everywhere).

When: only where it is safe and pays, i.e. a fork-capable POSIX platform (Linux; macOS' fork is unsafe with
its system frameworks), torch not yet imported (a fresh CLI process: forking after torch has started its
thread pools could deadlock the child) and ``CIFARBENCH_FIGURE_WORKER`` not ``0``. Everywhere else, and inside
a library call or a test that imported torch already, :func:`figure_worker` draws in-process, in order.

Jobs are module-level functions and picklable arguments (numpy arrays, :class:`OcclusionResult`, paths);
nothing that imports torch may travel, or the child would import it too. :meth:`Draw.wait` returns when every
figure is on disk and raises the first failure: a :class:`~cifarbench.errors.UserError` as itself (one
``error:`` line), anything else with the child's traceback text.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from .errors import UserError

ENV = "CIFARBENCH_FIGURE_WORKER"


def can_fork() -> bool:
    """Whether a figure worker may be forked here and now (see the module docstring)."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork") and "torch" not in sys.modules
            and os.environ.get(ENV, "1").strip() != "0")


class Draw:
    """``draw(fn, *args, **kwargs)`` runs a figure job (in the worker when there is one); ``draw.wait()`` blocks
    until every job so far has finished and raises the first failure."""

    def __init__(self, conn=None, process=None):
        self.conn, self.process = conn, process
        self.pending = 0

    @property
    def forked(self) -> bool:
        return self.process is not None

    def __call__(self, fn, *args, **kwargs) -> None:
        if self.process is None:
            fn(*args, **kwargs)
            return
        self.conn.send((fn, args, kwargs))
        self.pending += 1

    def wait(self) -> None:
        failure = None
        while self.pending:
            try:
                reply = self.conn.recv()
            except EOFError:
                raise RuntimeError(f"the figure worker (pid {self.process.pid}) died with {self.pending} "
                                   f"figure(s) unwritten") from None
            self.pending -= 1
            if reply[0] != "ok" and failure is None:
                failure = reply
        if failure is not None:
            kind, text = failure
            if kind == "user":
                raise UserError(text)
            raise RuntimeError(f"a figure failed in the figure worker:\n{text}")

    def close(self, abort: bool = False) -> None:
        if self.process is None:
            return
        if abort and self.process.is_alive():
            self.process.terminate()  # an error in the parent: figures of a failed run are not wanted
        try:
            self.conn.close()  # EOF: the worker exits after its current job
        finally:
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
            self.process = None


@contextmanager
def figure_worker(enabled: bool = True):
    """A :class:`Draw`, forked when :func:`can_fork` says so and ``enabled``; the worker is stopped on exit
    (terminated if the block raised). Call ``draw.wait()`` inside the block before using the figures."""
    draw = Draw()
    if enabled and can_fork():
        import multiprocessing as mp

        sys.stdout.flush()  # nothing buffered before the fork may be written twice
        sys.stderr.flush()
        parent, child = mp.get_context("fork").Pipe()
        process = mp.get_context("fork").Process(target=_serve, args=(child, parent), daemon=True,
                                                 name="cifarbench-figures")
        process.start()
        child.close()
        draw = Draw(parent, process)
    try:
        yield draw
    except BaseException:
        draw.close(abort=True)
        raise
    draw.close()


def _serve(conn, parents_end) -> None:
    """The worker: load matplotlib and warm it, then run jobs until the parent closes the pipe."""
    import signal
    import traceback

    parents_end.close()  # the fork copied it: while the worker held it open, it would never see the EOF
    # Ctrl-C reaches the whole process group: the parent handles it (and stops the worker), the worker stays quiet;
    # SIGTERM (the parent's terminate()) ends it at once, not through the CLI's handler copied by the fork
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    try:
        _warm()
    except Exception:  # noqa: BLE001 (a job will fail with the real error, in the parent's words)
        pass
    while True:
        try:
            fn, args, kwargs = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        try:
            fn(*args, **kwargs)
            reply = ("ok", "")
        except UserError as exc:
            reply = ("user", str(exc))
        except BaseException:  # noqa: BLE001 (reported to the parent, which raises it)
            reply = ("error", traceback.format_exc())
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


def _warm() -> None:
    """Import matplotlib (Agg) and the figure modules, and draw a small figure with text and a colorbar: the first
    draw loads the font files and builds caches that the real figure would otherwise wait for."""
    import io

    import numpy as np

    from .analysis import figures, occlusion_plot  # noqa: F401 (imported for their matplotlib imports)

    plt = figures._plt()
    fig, ax = plt.subplots(figsize=(2, 2), layout="constrained")
    im = ax.imshow(np.zeros((4, 4)), cmap="viridis")
    ax.set_title("warm-up\nline", fontsize=9)
    fig.colorbar(im, ax=ax).set_label("p", fontsize=8)
    fig.text(0.5, 0.0, "caption", fontsize=7)
    fig.savefig(io.BytesIO(), format="png", dpi=40)
    plt.close(fig)
