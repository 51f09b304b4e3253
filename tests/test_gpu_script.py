"""The one-call GPU script must work before GPU time is spent on it: its dry run does every step on the CPU."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "CIFARBENCH_GPU_BUDGET": "1200",
           "CIFARBENCH_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=1500, env=env)
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["device"] == "cpu"
    assert summary["training"]["epochs"] == 1
    assert {r["precision"] for r in summary["inference"]} >= {"fp32", "bf16", "fp16"}
    assert all("error" not in r for r in summary["occlusion"]), summary["occlusion"]
    assert " failed" not in log and "Traceback" not in log
    # GPU tests run one process each (a crash costs only its test); on the CPU the one dry-run test skips
    assert re.search(r"rc=0 tests/\S+::\S+: 1 skipped", log), log[-3000:]
    bench = json.loads((out / "bench.json").read_text())
    assert {b["group"].split("-")[0] for b in bench["benchmarks"]} == {"net4", "train"}
    assert len(bench["benchmarks"]) == 3
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).stat().st_size < 16 << 20 for f in files)
    assert "runs.json" in files and "net4.safetensors" in files
    runs = json.loads((out / "runs.json").read_text())
    assert "epoch" in runs["net4"]["metrics_csv"].splitlines()[0]
