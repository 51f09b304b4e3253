"""Winograd F(2x2, 3x3) against the definition of a convolution (float64 ``F.conv2d``), and the exact engines
that use it against the naive occlusion loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model
from test_incremental import naive_logits as naive_chain_logits
from test_incremental_graph import check_exact, randomize_bn
from torch import nn

from cifarbench.kernels import winograd
from cifarbench.kernels.incremental import IncrementalOcclusion
from cifarbench.kernels.winograd import Winograd3x3


def reference(x, weight, bias, relu):
    """The convolution by definition, in float64: NHWC in and out."""
    y = F.conv2d(x.permute(0, 3, 1, 2).double(), weight.double(), None if bias is None else bias.double())
    y = y.clamp_min(0) if relu else y
    return y.permute(0, 2, 3, 1)


@pytest.mark.parametrize("r,h,w,c,co,bias,relu", [
    (3, 14, 14, 128, 64, True, True),     # even output, written in place
    (2, 13, 9, 128, 32, True, False),     # odd output rows and columns: padded tiles, cropped
    (12, 8, 10, 128, 16, False, True),    # more tiles than MAX_TILES: several GEMMs
    (1, 3, 3, 130, 8, True, False),       # one output pixel
])
def test_winograd_equals_the_convolution(r, h, w, c, co, bias, relu):
    g = torch.Generator().manual_seed(r * h + c)
    x = torch.randn(r, h, w, c, generator=g).clamp_min(0)
    weight = torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5
    b = torch.randn(co, generator=g) if bias else None
    ref = reference(x, weight, b, relu)
    direct = F.conv2d(x.permute(0, 3, 1, 2), weight, b).permute(0, 2, 3, 1)
    direct = direct.clamp_min(0) if relu else direct
    out = torch.full((r, h - 2, w - 2, co), float("nan"))
    Winograd3x3(weight, b)(x, out, {}, relu=relu)
    err, direct_err = (out - ref).abs().max().item(), (direct - ref).abs().max().item()
    assert not out.isnan().any()
    # F(2x2, 3x3)'s transforms (entries 0, +-1, 1/2) keep its rounding at the direct method's level
    assert err <= max(2 * direct_err, 1e-6 * ref.abs().max().item())


def test_winograd_writes_a_strided_output_and_reuses_its_scratch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 10, 12, 128, generator=g)
    weight, b = torch.randn(24, 128, 3, 3, generator=g) * 0.03, torch.randn(24, generator=g)
    conv, scratch = Winograd3x3(weight, b), {}
    nchw = torch.empty(4, 24, 8, 10)  # its NHWC view is not contiguous: the tiles go through the scratch
    conv(x, nchw.permute(0, 2, 3, 1), scratch)
    assert torch.allclose(nchw.permute(0, 2, 3, 1).double(), reference(x, weight, b, False), atol=1e-5)
    buffers = {k: v.data_ptr() for k, v in scratch.items()}
    conv(x[:2], torch.empty(2, 8, 10, 24), scratch)  # smaller: the same buffers
    assert {k: v.data_ptr() for k, v in scratch.items()} == buffers


def test_only_wide_3x3_stride_1_fp32_cpu_convs_fit():
    w = torch.zeros(8, winograd.MIN_CHANNELS, 3, 3)
    assert winograd.fits(w, 1, 1, 1) and winograd.fits(w, (1, 1), (1, 1), 1)
    assert not winograd.fits(w, 2, 1, 1)
    assert not winograd.fits(w, 1, 2, 1)
    assert not winograd.fits(w, 1, 1, 2)
    assert not winograd.fits(torch.zeros(8, winograd.MIN_CHANNELS, 5, 5), 1, 1, 1)
    assert not winograd.fits(torch.zeros(8, winograd.MIN_CHANNELS - 1, 3, 3), 1, 1, 1)
    assert not winograd.fits(w.bfloat16(), 1, 1, 1)


def test_chain_engine_with_winograd_equals_the_naive_loop():
    """net4's 128- to 512-channel layers run on Winograd; the maps stay the naive loop's."""
    model = random_model("net4", seed=31)
    engine = IncrementalOcclusion(model, "cpu", chunk=13)
    assert sum(conv.winograd is not None for conv in engine.convs) >= 3
    assert all(conv.winograd is None for conv in IncrementalOcclusion(model, "cpu", winograd=False).convs)
    g = torch.Generator().manual_seed(2)
    images, bases = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, generator=g)
    ref = naive_chain_logits(model, images, bases, 6, 5)
    got = engine.logits(images, bases, 6, 5)
    assert (got - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())
    assert (got.softmax(-1) - ref.softmax(-1)).abs().max() <= 1e-5


class WideBlocks(nn.Module):
    """128-channel 3x3 convs at an odd map size, each of Winograd's paths in the graph engine: a conv + BN (folded)
    + SiLU (a fused op other than ReLU), a conv feeding a residual add (no fused op), a conv + ReLU (fused into
    Winograd's output pass)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 128, 3, padding=1)
        self.a = nn.Conv2d(128, 128, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(128)
        self.b = nn.Conv2d(128, 128, 3, padding=1)
        self.c = nn.Conv2d(128, 128, 3, padding=1)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = F.silu(self.bn(self.a(x)))
        x = torch.relu(x + self.b(y))
        x = torch.relu(self.c(x))
        return self.head(x.mean((2, 3)))


def test_graph_engine_with_winograd_equals_the_naive_loop():
    torch.manual_seed(5)
    model = randomize_bn(WideBlocks())
    engine = check_exact(model, 7, 4, size=27)
    g = engine.graph(27)
    on_winograd = {g.nodes[v].name: g.nodes[v].post_names for v in engine._winograd[(27, 27)]}
    # the 3-channel stem stays direct; BN folded into a's weights (a label, not a post op), SiLU after it
    assert on_winograd == {"a": ["bn(folded)", "silu"], "b": [], "c": ["relu"]}
