"""``mode="auto"`` against the better of its two exact engines (issue 14, item 5: auto must never be more than 10 %
slower than the better of dense and incremental), on every zoo net and the bring-your-own ResNet-20 and
MobileNetV2 of tests/byo_models.py, K=8 and K=4, stride 1, one image (examples/cat.png).

Per net and K: a fresh calibration (its own cache folder, so auto measures here and now; its time is recorded, not
benchmarked), then rounds that each time one full map of dense and of incremental (in the round's setup, untimed
by pytest-benchmark) and of auto (the benchmark itself), interleaved so a load spike hits all three. Recorded in
``extra_info``: the three medians, ``auto_over_best`` (auto's median over the better one's; target <= 1.10), what
auto chose and why, the calibration's own estimates and time. Auto's map must equal dense's within 1e-5.

    pytest benchmarks/test_bench_auto.py --benchmark-json=auto.json
    CIFARBENCH_BENCH_AUTO_BACKEND=auto pytest benchmarks/test_bench_auto.py   # dense through auto's backend (ORT)

The dense side runs on eager torch by default (``backend="torch"``); with ``CIFARBENCH_BENCH_AUTO_BACKEND=auto``
it is the backend ``auto`` picks for the dense engine (ONNX Runtime on the CPU), as ``cifarbench occlude`` runs.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarbench.analysis.occlusion import load_image, make_engine, occlusion_maps

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "cat.png"
NETS = ("net1", "net2", "net3", "net4", "resnet20", "mobilenetv2_tiny")
KS = (8, 4)
STRIDE = 1
ROUNDS = int(os.environ.get("CIFARBENCH_BENCH_AUTO_ROUNDS", "3"))
BACKEND = os.environ.get("CIFARBENCH_BENCH_AUTO_BACKEND", "torch")
TARGET = 1.10


def _model(name: str):
    if name.startswith("net"):
        from cifarbench.zoo import bundled_weights, create_model, load_model

        if bundled_weights(name):
            return load_model(name)
        torch.manual_seed(0)
        return create_model(name).eval()
    sys.path.insert(0, str(REPO / "tests"))
    import byo_models

    torch.manual_seed(0)
    return getattr(byo_models, name)().eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("net", NETS)
def test_auto_vs_the_better_exact_engine(benchmark, record, device, net, k, tmp_path, monkeypatch):
    from cifarbench import data

    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)  # a fresh decision: auto measures in this run
    monkeypatch.setenv("CIFARBENCH_AUTO", "measure")
    benchmark.group = f"auto-{net}-k{k}"
    model = _model(net).to(device)
    image = load_image(IMAGE)[0][None].to(device)
    cache: dict = {}
    engines = {mode: make_engine(model, k, STRIDE, BACKEND, mode, device, cache=cache)
               for mode in ("dense", "incremental")}
    started = time.perf_counter()
    engines["auto"] = make_engine(model, k, STRIDE, BACKEND, "auto", device, cache=cache)
    decide_s = time.perf_counter() - started
    maps = {}

    def one_map(mode):
        _sync(device)
        t = time.perf_counter()
        maps[mode] = occlusion_maps(engines[mode], image, k, stride=STRIDE)[0].map
        _sync(device)
        return time.perf_counter() - t

    for mode in engines:  # warm-up: plans, buffers, kernel selection
        one_map(mode)
    times = {"dense": [], "incremental": []}

    def others():
        for mode in times:
            times[mode].append(one_map(mode))

    benchmark.pedantic(lambda: one_map("auto"), setup=others, rounds=ROUNDS, iterations=1)
    assert np.abs(maps["auto"] - maps["dense"]).max() <= 1e-5
    if benchmark.stats is None:
        return
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    med["auto"] = benchmark.stats.stats.median
    best = min(med["dense"], med["incremental"])
    described = engines["auto"].describe()
    auto = described.get("auto", {})
    n = (image.shape[-1] - k) // STRIDE + 1
    record(images=n * n, net=net, k=k, stride=STRIDE, backend=BACKEND, dense_s=round(med["dense"], 4),
           incremental_s=round(med["incremental"], 4), auto_s=round(med["auto"], 4),
           auto_over_best=round(med["auto"] / best, 3), target=TARGET, meets_target=med["auto"] / best <= TARGET,
           faster=("incremental" if med["incremental"] < med["dense"] else "dense"), auto_choice=engines["auto"].mode,
           auto_engine=described.get("engine"), auto_why=described.get("why"), flop_ratio=auto.get("flop_ratio"),
           calibration_ms=auto.get("calibration_ms"), estimated_incremental_ms=auto.get("incremental_ms"),
           estimated_dense_ms=auto.get("dense_ms"), decide_s=round(decide_s, 3),
           load_1min=round(os.getloadavg()[0], 2))
