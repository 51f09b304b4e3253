"""Shared benchmark fixtures: device, a peak measured in the same run, and ``extra_info`` recording.

Targets are ratios against a baseline measured in the same run (these machines are shared and noisy), so each
suite benchmarks its baseline beside its subject in one ``group``.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

DEVICE = torch.device(os.environ.get("CIFARBENCH_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
# cuDNN runs fp32 convolutions in TF32 by default while matmuls stay fp32: turn it off so "fp32" means fp32 on
# both sides of every ratio (TF32 is measured explicitly, as a precision, in benchmarks/gpu/check.py)
torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    """GPU-only benchmarks (the issue's GPU targets) skip on a CPU run, as the tests do."""
    if DEVICE.type != "cuda":
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def peak_gflops() -> float:
    """Best-of-5 fp32 GFLOP/s of a large square matmul on ``DEVICE``: the machine's practical peak right now."""
    n = 4096 if DEVICE.type == "cuda" else 1024
    a = torch.randn(n, n, device=DEVICE)
    b = torch.randn(n, n, device=DEVICE)
    a @ b
    sync()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


@pytest.fixture
def record(benchmark, peak_gflops):
    """``record(images=N, flops=F, **info)`` after a benchmark run: stores device, images/s, GFLOP/s, % of peak."""

    def _record(images: int | None = None, flops: float | None = None, **info) -> None:
        if benchmark.stats is None:  # --benchmark-disable: the body ran once as a test, nothing was timed
            return
        mean = benchmark.stats.stats.mean
        extra = {"device": str(DEVICE), "device_name": _device_name(), "peak_gflops": round(peak_gflops, 1), **info}
        if images:
            extra["images_per_s"] = round(images / mean, 1)
        if flops:
            extra["gflops"] = round(flops / mean / 1e9, 2)
            extra["pct_of_peak"] = round(100 * flops / mean / 1e9 / peak_gflops, 1)
        benchmark.extra_info.update(extra)

    return _record


def _device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    import platform

    return platform.processor() or platform.machine()
