"""The figure worker (cifarbench.figure_worker): forked only in a process that has not imported torch, it writes
the same figures as drawing in-process, reports a job's failure in the parent (a UserError as itself), and is gone
when the block ends. Cold processes are real subprocesses: this test process has imported torch already."""
from __future__ import annotations

import hashlib
import json
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

        def disk_full(path):
            import errno
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

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
            except ValueError as exc:
                print("bug:", str(exc) == "a bug in a figure")
            draw(disk_full, out / "fig.png")
            try:
                draw.wait()
            except OSError as exc:   # as raised in the worker: the CLI prints its one error line
                print("os:", exc.errno, exc.filename)
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
    assert f"os: 28 {tmp_path / 'fig.png'}" in lines
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


_SPY = """
import sys
from contextlib import contextmanager
import cifarbench.figure_worker as fw
from cifarbench.cli import main

real, seen = fw.figure_worker, []

@contextmanager
def spy(*args, **kwargs):
    with real(*args, **kwargs) as draw:
        seen.append(draw.forked)
        yield draw

fw.figure_worker = spy
try:
    main(sys.argv[1:])
finally:
    print("forked:", seen, file=sys.stderr)
"""


@linux_only
def test_cli_figure_from_the_worker_equals_the_in_process_one_and_is_ours(tmp_path, capsys):
    """A cold ``occlude`` forks the worker (checked, not assumed); its PNG is byte-identical to the in-process one
    (drawn here: this process imported torch, so it does not fork), logged in the output folder's manifest, so the
    same command into the same folder runs again."""
    from cli_helpers import run_cli

    out = tmp_path / "worker"
    for _ in range(2):  # the second run replaces the first one's files: they are in its manifest
        done = subprocess.run([sys.executable, "-c", _SPY, "occlude", "--k", "8", "examples/cat.png", "--out",
                               str(out), "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**os.environ, "CIFARBENCH_FIGURE_WORKER": "1"})
        assert done.returncode == 0, done.stderr
        assert "forked: [True]" in done.stderr
        png = (out / "cat_occlusion.png").read_bytes()
        assert "cat_occlusion.png" in (out / "index.html").read_text()  # written after the figure
        manifest = [json.loads(line) for line in (out / ".cifarbench-outputs.jsonl").read_text().splitlines()]
        assert {"name": "cat_occlusion.png", "sha256": hashlib.sha256(png).hexdigest()} in manifest
    code, _, err = run_cli(capsys, "occlude", "--k", "8", str(ROOT / "examples" / "cat.png"), "--out",
                           tmp_path / "here", "--json")
    assert code == 0, err
    assert (tmp_path / "here" / "cat_occlusion.png").read_bytes() == png and png[:8] == b"\x89PNG\r\n\x1a\n"


@linux_only
def test_many_jobs_never_deadlock_and_a_dead_worker_s_jobs_are_drawn_here(tmp_path):
    result = _python(f"""
        import os, signal
        from pathlib import Path
        from cifarbench.figure_worker import figure_worker

        def write(path, text):
            Path(path).write_text(text + " " + str(os.getpid()))

        out = Path({str(tmp_path)!r})
        with figure_worker() as draw:
            for i in range(1500):   # far more answers than a socket buffer holds unread
                draw(write, out / f"{{i}}.txt", str(i))
            draw.wait()
            os.kill(draw.process.pid, signal.SIGKILL)
            draw.process.join()
            draw(write, out / "after.txt", "after")
            draw.wait()
            print("forked after death:", draw.forked)
        print("parent", os.getpid())
    """)
    assert result.returncode == 0, result.stderr
    parent = result.stdout.split()[-1]
    assert "forked after death: False" in result.stdout
    assert all((tmp_path / f"{i}.txt").read_text().startswith(f"{i} ") for i in range(1500))
    assert (tmp_path / "after.txt").read_text() == f"after {parent}"   # drawn in the parent once the worker died
