"""The incremental engine and BN folding, against the unmodified model run one occluded image at a time."""
from __future__ import annotations

import pytest
import torch
from conftest import random_model

from cifarbench.kernels.bn_fold import fold_bn
from cifarbench.kernels.incremental import IncrementalOcclusion, axis_windows, build_plan, layer_specs
from cifarbench.nets import count_flops


def naive_logits(model, images, baselines, k, stride):
    n = (32 - k) // stride + 1
    out = torch.empty(len(images), n * n, 10)
    with torch.no_grad():
        for b in range(len(images)):
            for p in range(n * n):
                y, x = (p // n) * stride, (p % n) * stride
                img = images[b].clone()
                img[:, y:y + k, x:x + k] = baselines[b][:, None, None]
                out[b, p] = model(img[None])[0]
    return out


@pytest.mark.parametrize("net", ["net1", "net2", "net3", "net4"])
def test_fold_bn_keeps_outputs(net):
    model = random_model(net, seed=11)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert (fold_bn(model)(x) - model(x)).abs().max() <= 1e-4
    assert all(not isinstance(b.bn, torch.nn.BatchNorm2d) for b in fold_bn(model).conv_blocks().values())


@pytest.mark.parametrize("net,k,stride,overrides", [
    ("net1", 8, 1, {}), ("net1", 5, 3, {"stride": 2}), ("net1", 7, 2, {"kernel_size": 5}),
    ("net2", 12, 5, {}), ("net3", 4, 7, {}), ("net4", 8, 6, {}), ("net4", 1, 9, {}), ("net4", 32, 1, {}),
])
def test_incremental_logits_equal_naive(net, k, stride, overrides):
    model = random_model(net, seed=12, **overrides)
    images = torch.rand(2, 3, 32, 32)
    baselines = torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.9, 0.3]])
    ref = naive_logits(model, images, baselines, k, stride)
    # a chunk that does not divide the position count exercises the chunk boundaries
    got = IncrementalOcclusion(model, "cpu", chunk=7).logits(images, baselines, k, stride)
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("buckets", [1, 2, 99])
def test_any_bucketing_is_exact(buckets):
    model = random_model("net4", seed=13)
    image, base = torch.rand(1, 3, 32, 32), torch.full((1, 3), 0.5)
    ref = naive_logits(model, image, base, 10, 4)
    got = IncrementalOcclusion(model, "cpu", buckets=buckets).logits(image, base, 10, 4)
    assert (got - ref).abs().max() <= 1e-5


def test_windows_cover_changed_region_and_stay_inside_maps():
    specs = layer_specs(random_model("net4"))
    for (start, size), ly in zip(axis_windows(specs, 8, 1, 3)[1:], specs):
        assert (start >= 0).all() and (start + size <= ly.s_out).all()


def test_incremental_saves_flops_on_net4():
    """Changed windows stop growing at the map border: at K=8 net4's incremental plan needs about half the
    dense conv FLOPs (0.46 with exact window sizes, ~0.5 with three size buckets)."""
    model = random_model("net4")
    n = 25 * 25
    dense_conv = count_flops(model) - sum(2 * m.in_features * m.out_features for m in model.head
                                          if isinstance(m, torch.nn.Linear))
    plan = build_plan(layer_specs(model), 8, 1, 0, n, 1, 3)
    assert plan.flops < 0.6 * dense_conv * n
    assert plan.positions == n


def test_parallel_chunks_equal_one_at_a_time():
    """Chunks in flight on worker threads (one core each) give the maps of chunks run one after another, and
    leave torch's thread count as it was."""
    model = random_model("net4", seed=14)
    image, base = torch.rand(2, 3, 32, 32), torch.rand(2, 3)
    threads = torch.get_num_threads()
    ref = IncrementalOcclusion(model, "cpu", chunk=9, workers=1).logits(image, base, 8, 3)
    engine = IncrementalOcclusion(model, "cpu", chunk=9, workers=3)
    got = engine.logits(image, base, 8, 3)
    assert (got - ref).abs().max() <= 1e-5
    assert torch.get_num_threads() == threads
    # buffers kept between calls hold nothing stale: another image and K on the same engine = a fresh engine
    other = torch.rand(1, 3, 32, 32)
    fresh = IncrementalOcclusion(model, "cpu", chunk=9, workers=1).logits(other, base[:1], 6, 2)
    assert (engine.logits(other, base[:1], 6, 2) - fresh).abs().max() <= 1e-5
