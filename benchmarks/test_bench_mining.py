"""Mining all 1,280 filters of net4 versus one plain forward pass over the same images, same backend.

Target (issue 6): mining costs at most 1.3x the plain forward pass over 2,000 test images (ratio recorded as
``ratio_to_forward`` in the mining benchmark's extra_info and printed). Backends: ``CIFARBENCH_BENCH_BACKENDS``
(default torch and onnxruntime).
"""
from __future__ import annotations

import os

import pytest
import torch

from cifarbench.analysis.mining import mine
from cifarbench.data import load_split
from cifarbench.filters import all_filters
from cifarbench.nets import count_flops
from cifarbench.zoo import create_model

IMAGES = int(os.environ.get("CIFARBENCH_BENCH_IMAGES", 2000))
BATCH = 250
BACKENDS = os.environ.get("CIFARBENCH_BENCH_BACKENDS", "torch,onnxruntime").split(",")
_means: dict[str, float] = {}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return create_model("net4").eval()  # timings do not depend on the weights


@pytest.fixture(scope="module")
def data():
    return load_split(f"synthetic:{5 * IMAGES}", "test")


_runtimes: dict[str, object] = {}


def runtime_for(backend, net, device):
    if backend not in _runtimes:
        if backend == "torch":
            from cifarbench.runtime import TorchRuntime

            rt = TorchRuntime(net, device)
        else:
            from cifarbench.export.onnx import to_onnx_proto
            from cifarbench.runtime.ort import OrtRuntime

            proto = to_onnx_proto(net)
            rt = OrtRuntime(proto, device)
            rt.proto = proto
        rt.logits(torch.rand(50, 3, 32, 32))  # first-call overheads out of the measurements
        _runtimes[backend] = rt
    return _runtimes[backend]


def forward_all(runtime, data):
    for i in range(0, len(data), BATCH):
        runtime.logits(data.images[i:i + BATCH].float().div_(255))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_baseline(benchmark, record, backend, net, data, device):
    benchmark.group = f"mining-net4-{backend}"
    rt = runtime_for(backend, net, device)
    benchmark.pedantic(forward_all, args=(rt, data), rounds=1, warmup_rounds=0)
    _means[backend] = benchmark.stats.stats.mean
    record(images=IMAGES, flops=count_flops(net) * IMAGES, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mine_all_filters(benchmark, record, backend, net, data, device):
    benchmark.group = f"mining-net4-{backend}"
    rt = runtime_for(backend, net, device)
    selection = all_filters(net)
    result = benchmark.pedantic(lambda: mine(rt, net, data, selection, k=20, batch_size=BATCH),
                                rounds=1, warmup_rounds=0)
    assert len(result.selection) == 1280
    ratio = benchmark.stats.stats.mean / _means[backend]
    record(images=IMAGES, flops=count_flops(net) * IMAGES, backend=backend, ratio_to_forward=round(ratio, 3),
           target=1.3)
    print(f"\nmining 1280 filters over {IMAGES} images ({backend}): {ratio:.2f}x one plain forward pass")
