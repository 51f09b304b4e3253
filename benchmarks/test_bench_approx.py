"""Approximate occlusion (:mod:`cifarbench.kernels.approx`) on net4, K=8, stride 1, against Captum's ``Occlusion``
(softmax-wrapped eager model, best ``perturbations_per_eval`` of a short scan) and the exact graph engine, all in
the same run; then the speed/fidelity curve over 100 CIFAR-10 test images (exact maps from the exact graph engine;
SSIM from scikit-image, ``data_range=1``); then dataset scale: the exact engine's maps/s for 1 vs 16 images in one
call (windows batched across images).

    pytest benchmarks/test_bench_approx.py -s --benchmark-json=approx.json

``CIFARBENCH_APPROX_IMAGES`` (default 100) sets the curve's image count; ``CIFARBENCH_DATA_TAR`` the test set
(default /work/shared/data/cifar10-jpeg75.tar.gz; the curve skips when it is missing).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarbench.analysis.occlusion import load_image
from cifarbench.zoo import bundled_weights, create_model, load_model

IMAGE = Path(__file__).resolve().parents[1] / "examples" / "cat.png"
K, STRIDE = 8, 1
N = (32 - K) // STRIDE + 1
PPE_CANDIDATES = (64, 128, 625)
DATA = Path(os.environ.get("CIFARBENCH_DATA_TAR", "/work/shared/data/cifar10-jpeg75.tar.gz"))
IMAGES = int(os.environ.get("CIFARBENCH_APPROX_IMAGES", "100"))
#: (precision, coarse, tau) points of the curve; the first approx row is the default knob
CURVE = (("bf16", 4, 0.1), ("bf16", 1, 0.0), ("bf16", 4, 0.05), ("bf16", 4, 0.2), ("bf16", 2, 0.1),
         ("fp32", 4, 0.1))
_medians: dict[str, float] = {}
_maps: dict[str, np.ndarray] = {}


@pytest.fixture(scope="module")
def net4():
    if bundled_weights("net4"):
        model = load_model("net4")
    else:
        torch.manual_seed(0)
        model = create_model("net4").eval()
    image = load_image(IMAGE)[0]
    with torch.no_grad():
        target = int(model(image[None]).argmax())
    return model.eval(), image, target


def _ratios(name: str) -> dict:
    return {f"speedup_vs_{b}": round(t / _medians[name], 2) for b, t in _medians.items() if b != name}


@pytest.mark.benchmark(group="approx-net4-k8")
def test_captum(benchmark, record, net4, device):
    from captum.attr import Occlusion

    model, image, target = net4
    occ = Occlusion(torch.nn.Sequential(model.to(device), torch.nn.Softmax(dim=1)).eval())
    x = image[None].to(device)

    def run(ppe):
        with torch.no_grad():
            return occ.attribute(x, sliding_window_shapes=(3, K, K), strides=(3, STRIDE, STRIDE), baselines=0.5,
                                 target=target, perturbations_per_eval=ppe)

    times = {}
    for ppe in PPE_CANDIDATES:
        start = time.perf_counter()
        run(ppe)
        times[ppe] = time.perf_counter() - start
    ppe = min(times, key=times.get)
    benchmark.pedantic(lambda: run(ppe), rounds=3, warmup_rounds=0)
    _medians["captum"] = benchmark.stats.stats.median
    record(images=N * N, engine="captum", perturbations_per_eval=ppe, median_s=round(_medians["captum"], 4))


@pytest.mark.benchmark(group="approx-net4-k8")
def test_exact_graph(benchmark, record, net4, device):
    from cifarbench.kernels.incremental_graph import GraphOcclusion

    model, image, target = net4
    engine = GraphOcclusion(model.to(device), device)
    base = torch.full((1, 3), 0.5)
    res = benchmark.pedantic(lambda: engine.probability_maps(image[None], base, K, STRIDE, torch.tensor([target])),
                             rounds=3, warmup_rounds=1)
    _medians["exact"] = benchmark.stats.stats.median
    _maps["exact"] = res[0].cpu().numpy()
    record(images=N * N, engine="exact_graph", median_s=round(_medians["exact"], 4), **_ratios("exact"))


@pytest.mark.benchmark(group="approx-net4-k8")
def test_approx_default(benchmark, record, net4, device):
    from cifarbench.kernels.approx import ApproxOcclusion

    model, image, target = net4
    approx = ApproxOcclusion(model.to(device), device)
    base = torch.full((1, 3), 0.5)
    maps, info = benchmark.pedantic(lambda: approx.probability_maps(image[None], base, K, STRIDE,
                                                                    torch.tensor([target])),
                                    rounds=3, warmup_rounds=1)
    _medians["approx"] = benchmark.stats.stats.median
    extra = {"engine": "approx", **approx.knobs(), "exact_fraction": round(info["exact_positions"] / N / N, 3),
             "median_s": round(_medians["approx"], 4), **_ratios("approx")}
    if "exact" in _maps:
        extra["mean_abs_error"] = round(float(np.abs(maps[0].numpy() - _maps["exact"]).mean()), 5)
    record(images=N * N, **extra)
    print("\napprox net4 K=8 one image:", extra)


@pytest.fixture(scope="module")
def test_images(net4):
    if not DATA.exists():
        pytest.skip(f"{DATA} not found (set CIFARBENCH_DATA_TAR)")
    from cifarbench.data import load_split

    data = load_split(str(DATA), "test")
    return data.subset(slice(0, IMAGES)).float_images()


@pytest.mark.benchmark(group="approx-net4-curve")
def test_speed_fidelity_curve(benchmark, record, net4, test_images, device):
    """One timed pass per knob over the test images; ratios per map against the exact engine on the same images
    (and Captum's single-image median when it ran). The table goes to ``extra_info["curve"]`` and stdout."""
    from skimage.metrics import structural_similarity

    from cifarbench.kernels.approx import approx_probability_maps
    from cifarbench.kernels.incremental_graph import GraphOcclusion

    model = net4[0].to(device)
    x = test_images.to(device)
    bases = torch.full((len(x), 3), 0.5)
    with torch.no_grad():
        targets = model(x).argmax(1)
    exact_engine = GraphOcclusion(model, device)
    exact = benchmark.pedantic(lambda: exact_engine.probability_maps(x, bases, K, STRIDE, targets), rounds=1,
                               warmup_rounds=0).cpu().numpy()
    t_exact = benchmark.stats.stats.median
    engines = {"fp32": exact_engine, "bf16": GraphOcclusion(model, device, window_dtype=torch.bfloat16)}
    engines["bf16"].probability_maps(x[:1], bases[:1], K, STRIDE)  # warm: plans, buffers
    rows = []
    for precision, coarse, tau in CURVE:
        start = time.perf_counter()
        maps, info = approx_probability_maps(engines[precision], x, bases, K, STRIDE, targets, tau, coarse)
        elapsed = time.perf_counter() - start
        maps = maps.numpy()
        err = np.abs(maps - exact)
        ssim = [structural_similarity(maps[i], exact[i], data_range=1.0) for i in range(len(x))]
        row = {"precision": precision, "coarse": coarse, "tau": tau,
               "exact_fraction": round(info["exact_positions"] / info["positions"], 3),
               "maps_per_s": round(len(x) / elapsed, 3), "speedup_vs_exact": round(t_exact / elapsed, 2),
               "mean_ssim": round(float(np.mean(ssim)), 4), "min_ssim": round(float(np.min(ssim)), 4),
               "mean_abs_error": round(float(err.mean()), 5), "max_abs_error": round(float(err.max()), 4)}
        if "captum" in _medians:
            row["speedup_vs_captum"] = round(_medians["captum"] * len(x) / elapsed, 2)
        rows.append(row)
    record(images=len(x) * N * N, engine="curve", exact_maps_per_s=round(len(x) / t_exact, 3), curve=rows)
    print(f"\nspeed/fidelity curve, net4 K=8 stride 1, {len(x)} test images (exact fp32: {len(x) / t_exact:.3f}"
          " maps/s)")
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(k, "-")) for k in keys))


@pytest.mark.benchmark(group="approx-net4-dataset-scale")
@pytest.mark.parametrize("images", [1, 16])
def test_exact_maps_per_s(benchmark, record, net4, test_images, device, images):
    """Item 4: many images in one engine call share each window op, so a map costs less than alone."""
    from cifarbench.kernels.incremental_graph import GraphOcclusion

    model = net4[0].to(device)
    engine = GraphOcclusion(model, device)
    x = test_images[:images].to(device)
    bases = torch.full((images, 3), 0.5)
    benchmark.pedantic(lambda: engine.probability_maps(x, bases, K, STRIDE), rounds=2, warmup_rounds=1)
    t = benchmark.stats.stats.median
    extra = {"engine": "exact_graph", "maps_per_s": round(images / t, 3)}
    if "captum" in _medians:
        extra["captum_maps_per_s"] = round(1 / _medians["captum"], 3)
    record(images=images * N * N, **extra)
    print(f"\nexact graph engine, {images} image(s) per call: {images / t:.3f} maps/s", extra)
