"""Occlusion maps (one image, exact fp32) against Captum's ``Occlusion`` on the same model and window.

Targets (issue 4), net4, K=8, stride 1, one image, measured in one run on this CPU: >= 2.5x Captum (goal 3x) in
exact fp32; the INT8 runtime >= 6x (goal 10x), with its largest probability difference to the fp32 map reported.
Captum runs the softmax-wrapped eager model with the best ``perturbations_per_eval`` found by a short scan in
the same run. INT8 runs the ``onnx-int8`` runtime both dense and through the incremental plan on its int8
convolutions (:mod:`cifarbench.kernels.incremental_int8`). The grid group reports the ratio of ``mode="auto"`` to
Captum for every net and K in {4, 8, 12}.
Timings do not depend on the weights: bundled weights are used when present, else random ones (seed 0).

    pytest benchmarks/test_bench_occlusion.py --benchmark-json=occlusion.json
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarbench.analysis.occlusion import load_image, make_engine, occlusion_maps
from cifarbench.nets import count_flops
from cifarbench.zoo import bundled_weights, create_model, load_model

IMAGE = Path(__file__).resolve().parents[1] / "examples" / "cat.png"
PPE_CANDIDATES = (64, 128, 625)
GRID_NETS = os.environ.get("CIFARBENCH_BENCH_OCC_NETS", "net1,net2,net3,net4").split(",")
_means: dict[tuple, float] = {}
_maps: dict[str, np.ndarray] = {}


def _model(name: str):
    if bundled_weights(name):
        return load_model(name)
    torch.manual_seed(0)
    return create_model(name).eval()


def _captum(model, image, k, target, ppe):
    from captum.attr import Occlusion

    wrapped = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    occ = Occlusion(wrapped)

    def run():
        with torch.no_grad():
            return occ.attribute(image[None], sliding_window_shapes=(3, k, k), strides=(3, 1, 1), baselines=0.5,
                                 target=target, perturbations_per_eval=ppe)
    return run


def _best_ppe(model, image, k, target) -> int:
    """Captum's fastest ``perturbations_per_eval`` here, one timed run each."""
    times = {}
    for ppe in PPE_CANDIDATES:
        run = _captum(model, image, k, target, ppe)
        start = time.perf_counter()
        run()
        times[ppe] = time.perf_counter() - start
    return min(times, key=times.get)


@pytest.fixture(scope="module")
def net4(device):
    model = _model("net4")
    image = load_image(IMAGE)[0]
    with torch.no_grad():
        target = int(model(image[None]).argmax())
    return model, image, target


def _ours(benchmark, record, key, engine, image, k, model, rounds=2):
    res = benchmark.pedantic(lambda: occlusion_maps(engine, image[None], k)[0], rounds=rounds, warmup_rounds=1)
    _means[key] = benchmark.stats.stats.mean
    base = _means.get(key[:-1] + ("captum",))
    n = (33 - k) ** 2
    extra = {"mode": engine.mode, **engine.describe()}
    if base:
        extra["speedup_vs_captum"] = round(base / _means[key], 2)
    record(images=n, flops=count_flops(model) * n, **extra)
    return res


@pytest.mark.benchmark(group="occlusion-net4-k8")
def test_captum_occlusion(benchmark, record, net4):
    model, image, target = net4
    ppe = _best_ppe(model, image, 8, target)
    benchmark.pedantic(_captum(model, image, 8, target, ppe), rounds=2, warmup_rounds=1)
    _means[("net4", 8, "captum")] = benchmark.stats.stats.mean
    record(images=625, flops=count_flops(model) * 625, perturbations_per_eval=ppe)


@pytest.mark.benchmark(group="occlusion-net4-k8")
@pytest.mark.parametrize("mode,backend", [("dense", "onnxruntime"), ("dense", "torch"), ("incremental", "torch"),
                                          ("auto", None)])
def test_cifarbench_fp32(benchmark, record, net4, device, mode, backend):
    model, image, _ = net4
    engine = make_engine(model, 8, 1, backend, mode, device)
    res = _ours(benchmark, record, ("net4", 8, f"{mode}-{backend}"), engine, image, 8, model)
    _maps.setdefault("fp32", res.map)
    assert np.abs(res.map - _maps["fp32"]).max() <= 1e-5  # every exact engine gives the same map


@pytest.fixture(scope="module")
def int8_runtime(net4):
    from cifarbench.runtime import open_runtime

    calib = os.environ.get("CIFARBENCH_CALIB_DATA", "synthetic")
    return open_runtime(net4[0], "onnx-int8", "cpu", calib_data=calib, calib=64), calib


@pytest.mark.benchmark(group="occlusion-net4-k8")
@pytest.mark.parametrize("mode", ["dense", "incremental"])
def test_cifarbench_int8(benchmark, record, net4, int8_runtime, mode):
    model, image, _ = net4
    runtime, calib = int8_runtime
    engine = make_engine(runtime, 8, 1, mode=mode)
    res = _ours(benchmark, record, ("net4", 8, f"int8-{mode}"), engine, image, 8, model)
    if "fp32" in _maps:
        benchmark.extra_info["max_prob_diff_vs_fp32"] = float(np.abs(res.map - _maps["fp32"]).max())
    benchmark.extra_info["calib_data"] = calib


@pytest.mark.benchmark(group="occlusion-grid")
@pytest.mark.parametrize("net,k,who", [(n, k, w) for n in GRID_NETS for k in (4, 8, 12) for w in ("captum", "auto")])
def test_grid(benchmark, record, device, net, k, who):
    """Run in the order captum, auto per (net, k): the auto entry records its speedup over the captum one."""
    model = _model(net)
    image = load_image(IMAGE)[0]
    if who == "captum":
        with torch.no_grad():
            target = int(model(image[None]).argmax())
        benchmark.pedantic(_captum(model, image, k, target, 128), rounds=1, warmup_rounds=0)
        _means[(net, k, "captum")] = benchmark.stats.stats.mean
        record(images=(33 - k) ** 2, flops=count_flops(model) * (33 - k) ** 2, net=net, k=k,
               perturbations_per_eval=128)
        return
    engine = make_engine(model, k, 1, None, "auto", device)
    _ours(benchmark, record, (net, k, "auto"), engine, image, k, model, rounds=1)
    benchmark.extra_info.update(net=net, k=k)


@pytest.mark.gpu
@pytest.mark.benchmark(group="occlusion-gpu-1000")
def test_gpu_occlusion_1000_images(benchmark, device):
    """Target: K=8 maps for 1,000 test images in under 10 s on an H100."""
    from cifarbench.analysis.occlusion import occlude_dataset_throughput

    data = os.environ.get("CIFARBENCH_SHARED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                          "cifar10-jpeg75.tar.gz"))
    data = data if Path(data).is_file() else "synthetic:5000"
    out = benchmark.pedantic(lambda: occlude_dataset_throughput(_model("net4"), data, 1000, 8, device=device),
                             rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(out)
