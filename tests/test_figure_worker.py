"""The figure worker (cifarbench.figure_worker): forked only in a process that has not imported torch, it writes
the same figures as drawing in-process, reports a job's failure in the parent (a UserError as itself), and is gone
when the block ends. Cold processes are real subprocesses: this test process has imported torch already."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cifarbench.figure_worker import can_fork, figure_worker

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker forks on Linux only")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env}, cwd=ROOT)


def test_no_fork_once_torch_is_imported(tmp_path):
    assert "torch" in sys.modules and not can_fork()
    with figure_worker() as draw:
        draw((tmp_path / "a.txt").write_text, "drawn here")
        assert not draw.forked and (tmp_path / "a.txt").read_text() == "drawn here"  # at once, in order
        draw.wait()


@linux_only
def test_cold_process_forks_runs_jobs_and_reports_failures(tmp_path):
    result = _python(f"""
        import os, sys
        from pathlib import Path
        from cifarbench.errors import UserError
        from cifarbench.figure_worker import figure_worker

        def write(path, text):
            Path(path).write_text(text + " by " + str(os.getpid()))

        def refuse(message):
            raise UserError(message)

        def crash():
            raise ValueError("a bug in a figure")

        out = Path({str(tmp_path)!r})
        with figure_worker() as draw:
            assert draw.forked and "torch" not in sys.modules
            pid = draw.process.pid
            draw(write, out / "one.txt", "one")
            draw(refuse, "disk full while writing fig.png")
            draw(write, out / "two.txt", "two")   # later jobs still run
            try:
                draw.wait()
            except UserError as exc:
                print("user:", exc)
            draw(crash)
            try:
                draw.wait()
            except RuntimeError as exc:
                print("bug:", "ValueError: a bug in a figure" in str(exc))
        print("parent", os.getpid(), "worker", pid)
        try:
            os.kill(pid, 0)
            print("worker alive")
        except ProcessLookupError:
            print("worker gone")
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "user: disk full while writing fig.png" in lines and "bug: True" in lines and "worker gone" in lines
    parent, worker = lines[-2].split()[1], lines[-2].split()[3]
    assert parent != worker
    assert (tmp_path / "one.txt").read_text() == f"one by {worker}"   # written by the worker, not the parent
    assert (tmp_path / "two.txt").read_text() == f"two by {worker}"


@linux_only
def test_an_error_in_the_parent_stops_the_worker(tmp_path):
    result = _python("""
        import os, time
        from cifarbench.figure_worker import figure_worker

        def slow():
            time.sleep(60)

        try:
            with figure_worker() as draw:
                pid = draw.process.pid
                draw(slow)
                raise KeyError("parent failed")
        except KeyError:
            pass
        try:
            os.kill(pid, 0)
            print("worker alive")
        except ProcessLookupError:
            print("worker gone")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["worker", "gone"]


@linux_only
def test_cli_figure_from_the_worker_equals_the_in_process_one(tmp_path):
    figures = {}
    for worker in ("1", "0"):
        out = tmp_path / f"w{worker}"
        done = subprocess.run([sys.executable, "-m", "cifarbench.cli", "occlude", "--k", "8", "examples/cat.png",
                               "--out", str(out), "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**os.environ, "CIFARBENCH_FIGURE_WORKER": worker})
        assert done.returncode == 0, done.stderr
        figures[worker] = (out / "cat_occlusion.png").read_bytes()
        assert "cat_occlusion.png" in (out / "index.html").read_text()  # written after the figure
    assert figures["1"] == figures["0"] and figures["1"][:8] == b"\x89PNG\r\n\x1a\n"
