"""`ablate --sweep conv6` on net4 versus the same ablations run one by one through the full network (torch).

Target (issue 5): the sweep >= 1.5x faster than one-by-one over 2,000 test images. On this CPU one full net4 pass
over 2,000 images takes tens of seconds, so running all 512 conv6 variants one by one (hours) is not measured:
the same-ablation ratio is measured on the first ``CIFARBENCH_BENCH_SWEEP_K`` filters (both sides run exactly
those ablations plus the unablated baseline), and the full-layer ratio extrapolates the one-by-one cost, which
is linear in the number of variants ((1 + 512) / (1 + K) times the measured one), against the measured full sweep.
"""
from __future__ import annotations

import os

import pytest
import torch

from cifarbench.analysis.ablation import sweep, sweep_by_variants
from cifarbench.data import load_split
from cifarbench.filters import all_filters
from cifarbench.nets import count_flops
from cifarbench.zoo import create_model
from cifarbench.runtime import TorchRuntime

IMAGES = int(os.environ.get("CIFARBENCH_BENCH_IMAGES", 2000))
K = int(os.environ.get("CIFARBENCH_BENCH_SWEEP_K", 2))
_means: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(device):
    torch.manual_seed(0)
    net = create_model("net4").eval()  # timings do not depend on the weights
    data = load_split(f"synthetic:{5 * IMAGES}", "test")
    runtime = TorchRuntime(net, device)
    runtime.logits(data.float_images()[:50])  # first-call overheads out of the measurements
    layer = all_filters(net, ["conv6"])
    return net, data, runtime, layer


def _bench(benchmark, record, name, fn, net, passes_equiv):
    result = benchmark.pedantic(fn, rounds=1, warmup_rounds=0)
    _means[name] = benchmark.stats.stats.mean
    record(images=IMAGES, flops=passes_equiv * count_flops(net) * IMAGES, filters=passes_equiv)
    return result


@pytest.mark.benchmark(group="ablation-sweep-conv6")
def test_sweep_conv6_all_filters(benchmark, record, setup):
    net, data, runtime, layer = setup
    result = _bench(benchmark, record, "sweep_all", lambda: sweep(runtime, net, data, layer), net, 1)
    assert len(result["filters"]) == 512


@pytest.mark.benchmark(group="ablation-sweep-conv6")
def test_sweep_conv6_first_k(benchmark, record, setup):
    net, data, runtime, layer = setup
    _bench(benchmark, record, "sweep_k", lambda: sweep(runtime, net, data, layer[:K]), net, 1)


@pytest.mark.benchmark(group="ablation-sweep-conv6")
def test_one_by_one_first_k_baseline(benchmark, record, setup):
    net, data, runtime, layer = setup
    _bench(benchmark, record, "one_by_one_k", lambda: sweep_by_variants(runtime, net, data, layer[:K]), net, 1 + K)
    same = _means["one_by_one_k"] / _means["sweep_k"]
    full = _means["one_by_one_k"] * (1 + len(layer)) / (1 + K) / _means["sweep_all"]
    benchmark.extra_info.update(speedup_same_filters=round(same, 2), speedup_full_layer_extrapolated=round(full, 1),
                                k=K, target=1.5)
    print(f"\nsweep conv6 ({IMAGES} images): same {K} filters {same:.2f}x faster than one by one; "
          f"all 512 filters {_means['sweep_all']:.1f} s vs {full * _means['sweep_all']:.0f} s one by one "
          f"(extrapolated): {full:.0f}x")
