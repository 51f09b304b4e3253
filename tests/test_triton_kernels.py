"""The Triton occlusion kernels against their torch fallbacks, on the CPU through Triton's interpreter.

The interpreter runs each program instance in numpy, so the cases are tiny. ``TRITON_INTERPRET`` is set only
while these tests run and the kernels are re-decorated under it (and again after), so other tests are unaffected.
"""
from __future__ import annotations

import pytest
import torch
from conftest import random_model

from cifarbench.kernels import triton_occlusion as T
from cifarbench.kernels.bn_fold import folded_conv_params
from cifarbench.kernels.incremental import IncrementalOcclusion, build_plan, layer_specs

pytestmark = pytest.mark.skipif(not T.available(), reason="triton is not installed")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    T._kernels.cache_clear()
    yield
    T._kernels.cache_clear()


def test_occluded_batch_kernel_matches_torch():
    torch.manual_seed(0)
    images, base = torch.rand(2, 3, 32, 32), torch.rand(2, 3)
    got = T.occluded_batch(images, base, 12, 10, 1, 4)  # positions 1..3 of a 3x3 grid, both images
    ref = T.occluded_batch_torch(images, base, 12, 10, 1, 4)
    assert got.shape == (6, 3, 32, 32)
    assert (got - ref).abs().max() <= 1e-5
    # and the torch version is the definition: patch where it should be, image elsewhere
    assert torch.all(ref[0, :, 0:12, 10:22] == base[0][:, None, None])
    assert torch.equal(ref[0, :, 12:], images[0, :, 12:])


@pytest.mark.parametrize("net,overrides", [("net1", {}), ("net4", {"l1_oc": 8}), ("net1", {"stride": 2})])
def test_first_layer_kernel_matches_torch(net, overrides):
    """Fused occlusion + conv1 + bias + ReLU on the engine's real first-layer windows (two groups)."""
    model = random_model(net, seed=3, **overrides)
    weight, bias = folded_conv_params(model.conv_blocks()["conv1"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    base = torch.rand(1, 3) * 2 - 1
    specs = layer_specs(model)
    plan = build_plan(specs, 16, 8, 0, 9, 1, 3)
    step, ly = plan.steps[0], specs[0]
    for g, boxes in list(zip(step.groups, step.windows))[:2]:
        got = torch.full((g.n * g.h * g.w, ly.c_out), -7.0)
        ref = torch.full_like(got, -3.0)
        T.first_layer_windows(x, base, weight, bias, boxes, g.h, g.w, 16, ly.s, ly.q, got)
        T.first_layer_windows_torch(x, base, weight, bias, boxes, g.h, g.w, 16, ly.s, ly.q, ref)
        assert (got - ref).abs().max() <= 1e-5


def test_engine_with_triton_first_layer_is_exact():
    model = random_model("net1", seed=4)
    image, base = torch.rand(1, 3, 32, 32), torch.rand(1, 3)
    engine = IncrementalOcclusion(model, "cpu", first_layer="torch")
    ref = engine.logits(image, base, 24, 8)
    engine.use_triton = True
    assert (engine.logits(image, base, 24, 8) - ref).abs().max() <= 1e-5
