"""Dataset-scale exact occlusion (issue 14, item 4): maps/s over the first ``CIFARBENCH_DATASET_IMAGES`` (default
1,000) CIFAR-10 test images, net4, K=8, stride 1, against Captum's ``Occlusion`` maps/s in the same run.

    pytest benchmarks/test_bench_dataset.py -s -p no:cacheprovider --benchmark-json=dataset.json

Captum's cost per map does not depend on the image (every map is the same 625 dense forward passes), so its
maps/s is timed on the first ``CIFARBENCH_DATASET_CAPTUM_IMAGES`` (default 10) of the same images, each with its
own clean prediction as the target and Captum's best ``perturbations_per_eval`` of a short scan; ours is the
library's dataset path (:func:`cifarbench.analysis.occlusion.occlude_dataset_throughput`: the exact engine
``auto`` picks, images batched per call, every map checked finite). ``CIFARBENCH_DATA_TAR`` names the test set
(default /work/shared/data/cifar10-jpeg75.tar.gz; skips when it is missing).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from cifarbench.analysis.occlusion import occlude_dataset_throughput
from cifarbench.zoo import bundled_weights, create_model, load_model

K, STRIDE = 8, 1
DATA = Path(os.environ.get("CIFARBENCH_DATA_TAR", "/work/shared/data/cifar10-jpeg75.tar.gz"))
IMAGES = int(os.environ.get("CIFARBENCH_DATASET_IMAGES", "1000"))
CAPTUM_IMAGES = int(os.environ.get("CIFARBENCH_DATASET_CAPTUM_IMAGES", "10"))
PPE_CANDIDATES = (64, 128, 625)
_rates: dict[str, float] = {}


@pytest.fixture(scope="module")
def net4():
    if bundled_weights("net4"):
        return load_model("net4").eval()
    torch.manual_seed(0)
    return create_model("net4").eval()


@pytest.fixture(scope="module")
def images():
    if not DATA.exists():
        pytest.skip(f"{DATA} not found (set CIFARBENCH_DATA_TAR)")
    from cifarbench.data import load_split

    return load_split(str(DATA), "test").subset(slice(0, IMAGES)).float_images()


@pytest.mark.benchmark(group="dataset-net4-k8")
def test_captum_maps_per_s(benchmark, record, net4, images):
    from captum.attr import Occlusion

    occ = Occlusion(torch.nn.Sequential(net4, torch.nn.Softmax(dim=1)).eval())
    x = images[:CAPTUM_IMAGES]
    with torch.no_grad():
        targets = net4(x).argmax(1).tolist()

    def one(i, ppe):
        with torch.no_grad():
            return occ.attribute(x[i:i + 1], sliding_window_shapes=(3, K, K), strides=(3, STRIDE, STRIDE),
                                 baselines=0.5, target=targets[i], perturbations_per_eval=ppe)

    times = {}
    for ppe in PPE_CANDIDATES:
        start = time.perf_counter()
        one(0, ppe)
        times[ppe] = time.perf_counter() - start
    ppe = min(times, key=times.get)
    benchmark.pedantic(lambda: [one(i, ppe) for i in range(len(x))], rounds=1, warmup_rounds=0)
    _rates["captum"] = len(x) / benchmark.stats.stats.median
    record(images=len(x), engine="captum", perturbations_per_eval=ppe, maps_per_s=round(_rates["captum"], 4))
    print(f"\nCaptum: {_rates['captum']:.4f} maps/s over {len(x)} images (ppe {ppe})")


@pytest.mark.benchmark(group="dataset-net4-k8")
@pytest.mark.parametrize("batch", [16])
def test_cifarbench_maps_per_s(benchmark, record, net4, images, batch):
    result = benchmark.pedantic(lambda: occlude_dataset_throughput(net4, str(DATA), n=len(images), k=K,
                                                                   stride=STRIDE, mode="auto", batch=batch),
                                rounds=1, warmup_rounds=0)
    extra = {k: result[k] for k in ("images", "seconds", "maps_per_s", "batch", "engine", "mode", "why")}
    if "captum" in _rates:
        extra["speedup_vs_captum"] = round(result["maps_per_s"] / _rates["captum"], 2)
        extra["captum_maps_per_s"] = round(_rates["captum"], 4)
    record(**extra)
    print(f"\ncifarbench: {result['maps_per_s']:.3f} maps/s over {result['images']} images", extra)
