"""``cifarbench bench --from`` on pytest-benchmark JSON: the table, the JSON rows, comparisons and the errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import assert_user_error, run_cli

REAL = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu-2026-11-28" / "bench.json"


def bench(name: str, group: str | None, mean: float, **extra) -> dict:
    """One benchmark as ``--benchmark-json`` writes it (the stats this module reads, and a few it does not)."""
    return {"group": group, "name": name, "fullname": f"benchmarks/test_bench_x.py::{name}", "params": None,
            "stats": {"min": 0.9 * mean, "max": 1.1 * mean, "mean": mean, "stddev": 0.01, "median": 0.99 * mean,
                      "rounds": 5, "iterations": 1},
            "options": {"disable_gc": False}, "extra_info": extra}


def run_doc(*benchmarks: dict) -> dict:
    return {"machine_info": {"node": "box", "processor": "x86_64", "cpu": {"brand_raw": "Test CPU", "count": 2}},
            "commit_info": {"id": "abc"}, "benchmarks": list(benchmarks),
            "datetime": "2026-12-01T10:00:00.123456+00:00", "version": "5.3.1"}


# groups interleaved in the file (as a merge of suites can leave them): the report groups them
CPU_RUN = run_doc(
    bench("test_eager", "inference", 0.5, device="cpu", backend="torch", precision="fp32", batch=625,
          images_per_s=1250.0, gflops=10.0, pct_of_peak=5.0, peak_gflops=200.0),
    bench("test_train[seed]", "train", 2.0, device="cpu", precision="fp32", batch=128, images_per_s=64.0),
    bench("test_ort", "inference", 0.2, device="cpu", backend="onnxruntime", precision="fp32", batch=625,
          images_per_s=3125.0, speedup_vs_torch=2.5),
    bench("test_int8[dense-onnx]", "inference", 0.125, device="cpu", precision="int8", batch=625,
          max_prob_diff_vs_fp32=0.05),
    bench("test_train[fast]", "train", 3.0, device="cpu", precision="bf16-autocast", batch=512),
    bench("test_ungrouped", None, 1.0),
)


@pytest.fixture(autouse=True)
def terminal_120(monkeypatch):
    """The width the report is laid out for (rich reads COLUMNS when the console is not a terminal)."""
    monkeypatch.setenv("COLUMNS", "120")


@pytest.fixture
def write(tmp_path):
    def _write(name: str, content) -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    return _write


def test_json_rows_grouped_with_ratios(capsys, write):
    code, out, _ = run_cli(capsys, "bench", "--from", write("cpu.json", CPU_RUN), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["format"] == "pytest-benchmark" and report["datetime"] == CPU_RUN["datetime"]
    assert report["machine"] == {"host": "box", "cpu": "Test CPU", "cores": 2}
    rows = {r["name"]: r for r in report["rows"]}
    assert [r["name"] for r in report["rows"]] == ["test_eager", "test_ort", "test_int8[dense-onnx]",
                                                   "test_train[seed]", "test_train[fast]", "test_ungrouped"]
    eager = rows["test_eager"]
    assert eager["mean_s"] == 0.5 and eager["median_s"] == pytest.approx(0.495) and eager["rounds"] == 5
    assert (eager["backend"], eager["precision"], eager["batch"], eager["images_per_s"], eager["gflops"],
            eager["pct_of_peak"]) == ("torch", "fp32", 625, 1250.0, 10.0, 5.0)
    assert "peak_gflops" not in eager and rows["test_ort"]["speedup_vs_torch"] == 2.5
    assert rows["test_int8[dense-onnx]"]["max_prob_diff_vs_fp32"] == 0.05
    assert rows["test_int8[dense-onnx]"]["images_per_s"] is None
    # mean over the fastest mean of the group: 0.125 s in "inference", 2.0 s in "train"
    expected = {"test_eager": 0.5 / 0.125, "test_ort": 0.2 / 0.125, "test_int8[dense-onnx]": 1.0,
                "test_train[seed]": 1.0, "test_train[fast]": 3.0 / 2.0, "test_ungrouped": 1.0}
    assert {name: r["vs_fastest"] for name, r in rows.items()} == pytest.approx(expected)
    assert rows["test_ungrouped"]["group"] is None


def test_table_names_every_benchmark(capsys, write):
    code, out, err = run_cli(capsys, "bench", "--from", write("cpu.json", CPU_RUN))
    assert code == 0 and err == ""  # the report is the result: stdout
    err = out
    assert "pytest-benchmark on box: Test CPU x2 (2026-12-01T10:00:00)" in err
    for b in CPU_RUN["benchmarks"]:
        assert b["name"] in err  # whole, brackets included: names are not rich markup
    for text in ("inference", "train", "(no group)", "4.00x slower", "1.60x slower", "1.50x slower", "1.00x",
                 "500.0 ms", "125.0 ms", "3,125", "speedup_vs_torch=2.5", "max_prob_diff_vs_fp32=0.05",
                 "bf16-autocast"):
        assert text in err, text
    lines = [line.strip() for line in err.splitlines()]
    # the train group's heading comes after the last inference row, whatever the file's order
    assert lines.index("train") > max(i for i, line in enumerate(lines) if line.startswith("test_int8"))


def test_real_gpu_run_renders_whole_at_120_columns(capsys):
    doc = json.loads(REAL.read_text())
    code, err, _ = run_cli(capsys, "bench", "--from", REAL)  # the report: stdout
    assert code == 0 and "NVIDIA H200" in err and "Intel(R) Xeon(R) Processor x16" in err
    assert all(b["name"] in err for b in doc["benchmarks"])
    assert "bf16-autocast" in err and "\N{HORIZONTAL ELLIPSIS}" not in err  # nothing cut to fit
    assert max(len(line) for line in err.splitlines()) <= 120
    code, out, _ = run_cli(capsys, "bench", "--from", REAL, "--json")
    report = json.loads(out)
    assert report["machine"] == {"host": "vm", "cpu": "Intel(R) Xeon(R) Processor", "cores": 16, "gpu": "NVIDIA H200"}
    assert len(report["rows"]) == len(doc["benchmarks"]) == 26
    by_name = {b["name"]: b for b in doc["benchmarks"]}
    for r in report["rows"]:
        b = by_name[r["name"]]
        assert r["mean_s"] == b["stats"]["mean"] and r["images_per_s"] == b["extra_info"]["images_per_s"]
    nchw, channels_last = (by_name[f"test_conv_path[conv3-conv-eager-{x}]"]["stats"]["mean"]
                           for x in ("nchw", "channels-last"))
    row = next(r for r in report["rows"] if r["name"] == "test_conv_path[conv3-conv-eager-nchw]")
    assert row["vs_fastest"] == pytest.approx(nchw / channels_last) and row["vs_fastest"] == pytest.approx(1.628, 1e-3)
    # the training recipes run different batches: they are ranked per image, not per round
    train = {r["name"]: r for r in report["rows"] if r["group"] == "train-net4"}
    assert train["test_train_throughput[fast]"]["vs_fastest"] == 1.0
    assert train["test_train_throughput[seed]"]["vs_fastest"] == pytest.approx(69458.0 / 25882.0, 1e-3)


def test_compare_matches_fullnames(capsys, write):
    base = write("base.json", run_doc(bench("test_a[x]", "g", 0.5), bench("test_b", "g", 0.2),
                                      bench("test_only_in_base", "g", 1.0)))
    other = write("other.json", run_doc(bench("test_only_in_other", "g", 1.0), bench("test_b", "g", 0.4),
                                        bench("test_a[x]", "g", 0.25)))
    code, out, _ = run_cli(capsys, "bench", "--from", base, "--compare", other, "--json")
    assert code == 0
    result = json.loads(out)
    assert (result["base"], result["other"]) == (str(base), str(other))
    assert [r["name"] for r in result["rows"]] == ["test_a[x]", "test_b"]  # base's order, unmatched ones skipped
    a, b = result["rows"]
    assert (a["base_mean_s"], a["other_mean_s"]) == (0.5, 0.25)
    assert a["speedup"] == pytest.approx(2.0) and a["time_ratio"] == pytest.approx(0.5)
    assert b["speedup"] == pytest.approx(0.5) and b["time_ratio"] == pytest.approx(2.0)
    code, err, _ = run_cli(capsys, "bench", "--from", base, "--compare", other)  # the comparison: stdout
    assert code == 0 and "test_a[x]" in err and "2.00x" in err and "0.50x" in err and "only_in" not in err


def test_compare_real_run_with_a_faster_copy(capsys, write):
    doc = json.loads(REAL.read_text())
    for b in doc["benchmarks"]:
        b["stats"]["mean"] /= 2
    code, out, _ = run_cli(capsys, "bench", "--from", REAL, "--compare", write("faster.json", doc), "--json")
    rows = json.loads(out)["rows"]
    assert code == 0 and len(rows) == 26 and all(r["speedup"] == pytest.approx(2.0) for r in rows)


CIFARBENCH_RUN = {"format": "cifarbench-bench/1", "net": "net1",
                  "results": [{"backend": "torch", "precision": "fp32", "device": "cpu", "batch": 1,
                               "images_per_s": 100.0, "latency_ms": {"mean": 10.0, "p50": 10.0, "p90": 11.0,
                                                                     "p99": 12.0}, "gflops": None}]}


@pytest.mark.parametrize("base, other, match", [
    (CPU_RUN, CIFARBENCH_RUN, "cannot compare"),
    (CIFARBENCH_RUN, CPU_RUN, "cannot compare"),
    (CPU_RUN, run_doc(bench("test_elsewhere", "g", 1.0)), "share no benchmark"),
    (CPU_RUN, "{not json", "not valid JSON"),
    (CPU_RUN, None, "no such benchmark results file"),
])
def test_compare_errors(capsys, write, base, other, match):
    other_path = write("other.json", other) if other is not None else "nowhere.json"
    assert_user_error(capsys, "bench", "--from", write("base.json", base), "--compare", other_path, match=match)


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ([1, 2, 3], "or a pytest-benchmark JSON"),
    ({"benchmarks": "none"}, "or a pytest-benchmark JSON"),
    (run_doc({"name": "test_x", "fullname": "t::test_x", "stats": {}}), "or a pytest-benchmark JSON"),
    (run_doc(bench("test_x", "g", 0.0)), "not a cifarbench bench result"),
])
def test_render_errors(capsys, write, content, match):
    assert_user_error(capsys, "bench", "--from", write("bad.json", content), match=match)


def test_missing_file(capsys):
    assert_user_error(capsys, "bench", "--from", "nowhere.json", match="no such benchmark results file")


def test_report_redirected_to_a_file_is_whole(tmp_path):
    """``cifarbench bench --from run.json > report.txt``: the report lands in the file, lines whole (not cut to
    80 columns), nothing of it on stderr."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    with open(tmp_path / "report.txt", "w") as f:
        done = subprocess.run([sys.executable, "-m", "cifarbench.cli", "bench", "--from", str(REAL)], stdout=f,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    text = (tmp_path / "report.txt").read_text()
    doc = json.loads(REAL.read_text())
    assert "…" not in text and all(b["name"] in text for b in doc["benchmarks"])
    assert max(len(line) for line in text.splitlines()) > 80
