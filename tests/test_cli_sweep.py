"""``cifarbench sweep``: outputs against a naive recomputation, Ray against local, a killed process resumed, errors."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from statistics import fmean

import pytest

from cli_helpers import assert_user_error, run_cli

GRID = ["--grid", "l1_oc=3,4", "--grid", "lr=0.05,0.02", "--grid", "batch_size=16"]
ARGS = ["net1", *GRID, "--epochs", "2", "--data", "synthetic:200", "--seed", "1"]
TIMING = ("epoch_duration", "run_duration")
PNG = b"\x89PNG\r\n\x1a\n"


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


LEAN = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: the CPU is shared


def _cmd(*args):
    return [sys.executable, "-c", "from cifarbench.cli import main; main()", *map(str, args)]


def _cli(*args, **kwargs):
    """The real command in its own process (stdout must hold the JSON document and nothing else)."""
    return subprocess.run(_cmd(*args), capture_output=True, text=True, check=True, env=LEAN, **kwargs)


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "local"
    proc = _cli("sweep", *ARGS, "--out", out, "--json")
    return out, json.loads(proc.stdout), proc.stderr


def test_local_sweep_writes_the_reports_tables(local_sweep):
    out, summary, log = local_sweep
    rows = _rows(out / "metrics.csv")
    assert len(rows) == 4 * 2 and [r["epoch"] for r in rows] == ["1", "2"] * 4
    assert {r["name"] for r in rows} == {"l1_oc=3,lr=0.05,batch_size=16", "l1_oc=3,lr=0.02,batch_size=16",
                                         "l1_oc=4,lr=0.05,batch_size=16", "l1_oc=4,lr=0.02,batch_size=16"}
    assert list(rows[0])[:9] == ["run", "epoch", "loss", "train_accuracy", "test_accuracy", "test_accuracy_tta",
                                 "epoch_duration", "run_duration", "total_parameters"]
    # every run's rows are its own run folder's metrics.csv
    for run in summary["runs"]:
        own = _rows(os.path.join(run["out"], "metrics.csv"))
        assert [{k: v for k, v in r.items() if k != "name"} for r in rows if r["name"] == run["name"]] == own
        assert run["status"] == "finished" and run["best_test_accuracy"] == max(float(r["test_accuracy"])
                                                                               for r in own)
    best = max(rows, key=lambda r: float(r["test_accuracy"]))
    assert (summary["best"]["name"], summary["best"]["epoch"]) == (best["name"], int(best["epoch"]))
    assert max(float(r["test_accuracy"]) for r in rows) > 0.2  # the runs learned something: tables mean something

    # grouped means, recomputed naively from metrics.csv, for every table written
    by = {tuple(g["by"]): g["rows"] for g in summary["grouped"]}
    assert list(by) == [("l1_oc",), ("lr",), ("l1_oc", "lr"), ("epoch",)]
    for keys, table in by.items():
        written = _rows(out / "grouped" / f"{'__'.join(keys)}.csv")
        assert len(written) == len(table)
        for entry, line in zip(table, written):
            members = [r for r in rows if all(float(r[k]) == float(entry[k]) for k in keys)]
            assert entry["runs"] == len({r["run"] for r in members})
            for metric in ("loss", "train_accuracy", "test_accuracy", "overfit%", "total_parameters"):
                naive = fmean(float(r[metric]) for r in members)
                assert entry[metric] == pytest.approx(naive, rel=1e-12)
                # the grouped CSVs are rounded for a reader (accuracies to 6 decimals, overfit% to 4); the JSON
                # above keeps the exact means
                assert float(line[metric]) == pytest.approx(naive, rel=1e-5, abs=1e-4)
    for png in ["test_accuracy.png", *(f"grouped_{'__'.join(k)}.png" for k in by)]:
        assert (out / "plots" / png).read_bytes()[:8] == PNG
    assert "run 4/4 l1_oc=4,lr=0.02,batch_size=16 done epoch 2/2" in log  # the live log, on stderr


def test_ray_executor_gives_the_same_table_as_local(local_sweep, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'cifarbench[ray]')")
    local_out, local_summary, _ = local_sweep
    proc = _cli("sweep", *ARGS, "--out", tmp_path / "ray", "--executor", "ray", "--ray-cpus", "2",
                "--cpus-per-trial", "1", "--json", timeout=300)
    summary = json.loads(proc.stdout)
    # every epoch of every task was streamed back to the driver while it ran (one log line each, off a terminal)
    assert sorted(line.split(" epoch ")[1][:3] for line in proc.stderr.splitlines() if " running epoch " in line) \
        == ["1/2"] * 4 + ["2/2"] * 4
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    local_rows, ray_rows = _rows(local_out / "metrics.csv"), _rows(tmp_path / "ray" / "metrics.csv")
    assert [r["name"] for r in ray_rows] == [r["name"] for r in local_rows]
    for a, b in zip(strip(ray_rows), strip(local_rows)):
        assert a.keys() == b.keys()
        for k in a:
            try:
                assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-6, abs=1e-9), k
            except ValueError:
                assert a[k] == b[k], k
    assert [g["by"] for g in summary["grouped"]] == [g["by"] for g in local_summary["grouped"]]
    for g, h in zip(summary["grouped"], local_summary["grouped"]):
        assert len(g["rows"]) == len(h["rows"])
        for x, y in zip(g["rows"], h["rows"]):
            assert x == pytest.approx(y, rel=1e-6, abs=1e-9)
    assert (summary["best"]["name"], summary["best"]["epoch"]) == \
        (local_summary["best"]["name"], local_summary["best"]["epoch"])


def test_a_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["net1", "--grid", "l1_oc=3,4,5", "--grid", "batch_size=16", "--grid", "lr=0.05", "--epochs", "2",
            "--data", "synthetic:200", "--out", out]
    proc = subprocess.Popen(_cmd("sweep", *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=LEAN)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("runs/*/results.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before a run finished"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/results.json")}
    # a started run (its config.json written) continues on --resume, even one killed before its first epoch's
    # state was saved: which of those the kill catches depends on timing, so both count as in flight
    in_flight = {p.parent.name for p in out.glob("runs/*/config.json")} - set(finished)
    assert 1 <= len(finished) < 3

    code, stdout, _ = run_cli(capsys, "sweep", *args, "--resume", "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert all(r["status"] == "finished" for r in summary["runs"])
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/results.json")
            if p.parent.name in finished} == finished  # finished runs were not redone
    assert {r["name"] for r in summary["runs"] if r["resumed"]} == in_flight
    rows = _rows(out / "metrics.csv")
    assert [(r["run"], r["epoch"]) for r in rows] == [(str(i), str(e)) for i in range(3) for e in (1, 2)]

    # everything finished: --resume again only rewrites the summary, here as the report's tables on stderr
    code, stdout, stderr = run_cli(capsys, "sweep", *args, "--resume")
    assert code == 0 and stdout == ""
    best = summary["best"]
    assert f"best: run {best['run']} (l1_oc={best['l1_oc']}, batch_size=16, lr=0.05) epoch {best['epoch']}" in stderr
    assert "by l1_oc" in stderr and "train acc %" in stderr and "3 runs done" not in stderr
    assert json.loads((out / "summary.json").read_text())["best"] == best


@pytest.mark.parametrize("args, match", [
    (["--grid", "depth=1,2"], "unknown key 'depth'"),
    (["--grid", "lr"], "expected key=v1,v2"),
    (["--grid", "lr="], "empty value"),
    (["--grid", "lr=0.1,,0.2"], "empty value"),
    (["--grid", "batch_size=big"], "not a valid int"),
    (["--grid", "lr=0.1", "--epochs", "0"], "must be positive"),
    (["--grid", "lr=0.1", "--recipe", "slow"], "unknown recipe"),
    (["--grid", "lr=0.1", "--executor", "spark"], "use local or ray"),
    (["--grid", "lr=0.1", "--address", "127.0.0.1:6379"], "--address needs --executor ray"),
    (["--grid", "lr=0.1", "--executor", "ray", "--cpus-per-trial", "0"], "--cpus-per-trial must be > 0"),
    (["--grid", "lr=0.1", "--data", "/no/such/cifar.tar.gz"], "no such file"),
])
def test_bad_input_is_one_line_and_exit_2(args, match, capsys, tmp_path):
    assert_user_error(capsys, "sweep", "net1", *args, "--out", tmp_path / "s", match=match)
    assert not (tmp_path / "s").exists()  # nothing claimed before the input was checked


def test_unknown_net_and_resume_mistakes(capsys, tmp_path):
    assert_user_error(capsys, "sweep", "net9", "--out", tmp_path / "s", match="unknown net 'net9'")
    assert_user_error(capsys, "sweep", "net1", "--grid", "lr=0.1", "--out", tmp_path / "s", "--resume",
                      match="no sweep")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text("{}")
    assert_user_error(capsys, "sweep", "net1", "--grid", "lr=0.1", "--data", "synthetic:20", "--out",
                      tmp_path / "s", match="already holds a sweep")


def test_unreachable_ray_address_is_one_line_and_exit_2(capsys, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'cifarbench[ray]')")
    t0 = time.monotonic()
    assert_user_error(capsys, "sweep", "net1", "--grid", "lr=0.1", "--executor", "ray", "--address", "127.0.0.1:1",
                      "--out", tmp_path / "s", match="cannot reach a Ray cluster at 127.0.0.1:1")
    assert time.monotonic() - t0 < 30
    assert_user_error(capsys, "sweep", "net1", "--grid", "lr=0.1", "--executor", "ray", "--address", "headnode",
                      "--out", tmp_path / "s", match="expected HOST:PORT")
    assert not (tmp_path / "s").exists()


def test_missing_ray_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    line = assert_user_error(capsys, "sweep", "net1", "--grid", "lr=0.1", "--executor", "ray", "--out",
                             tmp_path / "s", match="not installed")
    assert "pip install 'cifarbench[ray]'" in line
