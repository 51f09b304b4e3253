"""Figures drawn by a helper process forked at a cold start, so matplotlib loads while the parent loads torch.

Why: ``cifarbench occlude --k 8 img.png`` spends most of its wall time importing libraries, and the two big ones
are independent: torch (~1.4 s on a quiet 2-core Xeon) for the maps, matplotlib (~0.45 s, plus ~0.1 s for its
first text and colorbar draw) for the figure. A process forked *before* torch is imported imports matplotlib,
draws a throw-away figure to load fonts, and then waits for the figure jobs; the parent sends each one as soon as
its maps exist and goes on writing the other outputs. Only the figure step leaves the critical path, nothing
else changes: the same functions with the same arguments write the same files, under the same output-folder
guard (each job runs inside the parent's guarded folders, re-created in the worker by
:func:`cifarbench.io.guarded`: checked before writing, logged in the manifest before the rename; the parent
re-reads the manifest after :meth:`Draw.wait`).

When: only where it is safe and pays, i.e. a fork-capable POSIX platform (Linux; macOS' fork is unsafe with
its system frameworks), torch not yet imported (a fresh CLI process: forking after torch has started its
thread pools could deadlock the child) and ``CIFARBENCH_FIGURE_WORKER`` not ``0``. Everywhere else, and inside
a library call or a test that imported torch already, :func:`figure_worker` draws in-process, in order.

Jobs are module-level functions and picklable arguments (numpy arrays, :class:`OcclusionResult`, paths);
nothing that imports torch may travel, or the child would import it too. At most :data:`IN_FLIGHT` jobs are
unanswered at a time (the pipe never fills both ways). :meth:`Draw.wait` returns when every figure is on disk and
raises the first failure as it was raised in the worker (a :class:`~cifarbench.errors.UserError` or an
``OSError`` keeps its one-line message); if the worker dies, its unfinished jobs are drawn in-process.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
from contextlib import contextmanager

from . import io

ENV = "CIFARBENCH_FIGURE_WORKER"
#: figure jobs sent and not yet answered before :meth:`Draw.__call__` waits for one answer
IN_FLIGHT = 16
_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def can_fork() -> bool:
    """Whether a figure worker may be forked here and now (see the module docstring)."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork") and "torch" not in sys.modules
            and os.environ.get(ENV, "1").strip() != "0")


class _WorkerFailed(RuntimeError):
    """A figure job failed in the worker with an exception that could not travel back (its traceback text)."""


class Draw:
    """``draw(fn, *args, **kwargs)`` runs a figure job (in the worker when there is one); ``draw.wait()`` blocks
    until every job so far has finished and raises the first failure."""

    def __init__(self, conn=None, process=None):
        self.conn, self.process = conn, process
        self.pending: list[tuple] = []   # sent, not yet answered, in order (redrawn here if the worker dies)
        self.failure: BaseException | None = None

    @property
    def forked(self) -> bool:
        return self.process is not None

    def __call__(self, fn, *args, **kwargs) -> None:
        if self.process is not None:
            while len(self.pending) >= IN_FLIGHT or (self.pending and self._poll()):
                self._answer()
        if self.process is None:  # no worker, or it died above
            fn(*args, **kwargs)
            return
        job = (fn, args, kwargs)
        try:
            self.conn.send((*job, io.active_guards()))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self.pending.append(job)
            self._worker_died()
            return
        self.pending.append(job)

    def wait(self) -> None:
        while self.process is not None and self.pending:
            self._answer()
        io.reload_manifests()  # the worker logged its figures in the manifests
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def _poll(self) -> bool:
        try:
            return self.conn.poll(0)
        except (OSError, EOFError):
            return True  # recv will say what happened

    def _answer(self) -> None:
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            self._worker_died()
            return
        self.pending.pop(0)
        if kind != "ok" and self.failure is None:
            self.failure = pickle.loads(payload) if kind == "exception" else _WorkerFailed(
                f"a figure failed in the figure worker:\n{payload}")

    def _worker_died(self) -> None:
        """The worker is gone (killed, out of memory): its unanswered jobs are drawn here, and so are later ones."""
        jobs, self.pending = self.pending, []
        self.close()
        for fn, args, kwargs in jobs:
            fn(*args, **kwargs)

    def close(self, abort: bool = False) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        if abort and process.is_alive():
            process.terminate()  # an error in the parent: figures of a failed run are not wanted
        try:
            self.conn.close()  # EOF: the worker exits after its current job
        finally:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()


@contextmanager
def figure_worker(enabled: bool = True):
    """A :class:`Draw`, forked when :func:`can_fork` says so and ``enabled``; the worker is stopped on exit
    (terminated if the block raised). Call ``draw.wait()`` inside the block before using the figures."""
    draw = Draw()
    if enabled and can_fork():
        import multiprocessing as mp

        sys.stdout.flush()  # nothing buffered before the fork may be written twice
        sys.stderr.flush()
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(child, parent), daemon=True, name="cifarbench-figures")
        # no signal handler of the CLI may run in the child before _serve installs its own
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        child.close()
        draw = Draw(parent, process)
    try:
        yield draw
    except BaseException:
        draw.close(abort=True)
        raise
    draw.close()


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds the job: atomic_path removes its temporary file


def _serve(conn, parents_end) -> None:
    """The worker: load matplotlib and warm it, then run jobs until the parent closes the pipe."""
    import traceback

    parents_end.close()  # the fork copied it: while the worker held it open, it would never see the EOF
    # Ctrl-C reaches the whole process group: the parent handles it (and stops the worker), the worker ignores it;
    # SIGTERM (the parent's terminate()) ends the current job cleanly
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminated)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    try:
        try:
            _warm()
        except Exception:  # noqa: BLE001 (a job will fail with the real error, reported in the parent)
            pass
        while True:
            try:
                fn, args, kwargs, guards = conn.recv()
            except (EOFError, OSError):
                return
            try:
                with io.guarded(guards):
                    fn(*args, **kwargs)
                reply = ("ok", b"")
            except Exception as exc:  # noqa: BLE001 (raised again in the parent, as it was raised here)
                try:
                    reply = ("exception", pickle.dumps(exc))
                    pickle.loads(reply[1])
                except Exception:  # noqa: BLE001 (an exception that cannot travel: its traceback text does)
                    reply = ("text", traceback.format_exc())
            try:
                conn.send(reply)
            except (BrokenPipeError, OSError):
                return
    except SystemExit:
        return


def _warm() -> None:
    """Import matplotlib (Agg) and the figure modules, and draw a small figure with text and a colorbar: the first
    draw loads the font files and builds caches that the real figure would otherwise wait for."""
    import io as _io

    import numpy as np

    from .analysis import figures, occlusion_plot  # noqa: F401 (imported for their matplotlib imports)

    plt = figures._plt()
    fig, ax = plt.subplots(figsize=(2, 2), layout="constrained")
    im = ax.imshow(np.zeros((4, 4)), cmap="viridis")
    ax.set_title("warm-up\nline", fontsize=9)
    fig.colorbar(im, ax=ax).set_label("p", fontsize=8)
    fig.text(0.5, 0.0, "caption", fontsize=7)
    fig.savefig(_io.BytesIO(), format="png", dpi=40)
    plt.close(fig)
