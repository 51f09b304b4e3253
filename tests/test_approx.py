"""Approximate occlusion (:mod:`cifarbench.kernels.approx`): exact where its knobs say so (against the naive loop),
within the documented error on the bundled net4 and real images at the default knobs, and clear knob errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_incremental_graph import naive_logits
from torch import nn

from cifarbench.kernels.approx import (ApproxOcclusion, approx_probability_maps, check_knobs, default_precision,
                                       levels)
from cifarbench.kernels.incremental_graph import GraphOcclusion

torch.set_num_threads(1)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def naive_maps(model, x, bases, k, stride):
    ref = torch.softmax(naive_logits(model, x, bases, k, stride), -1)
    with torch.no_grad():
        t = model(x).argmax(1)
    n = (x.shape[2] - k) // stride + 1
    return ref[torch.arange(len(x)), :, t].view(len(x), n, -1)


def test_positions_list_equals_naive_loop():
    model = small_net()
    g = torch.Generator().manual_seed(1)
    x, bases = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, generator=g)
    ref = naive_logits(model, x, bases, 4, 1)
    engine = GraphOcclusion(model, "cpu", size=16, chunk=7)
    pos = np.array([168, 0, 5, 77, 77, 120, 13])  # any order, repeats allowed
    got = engine.logits(x, bases, 4, 1, positions=pos)
    assert got.shape == (2, len(pos), 10)
    assert (got - ref[:, pos]).abs().max() <= 1e-4 * (1 + ref.abs().max())
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 169\)"):
        engine.logits(x, bases, 4, 1, positions=[169])


class _Residual(nn.Module):
    """conv -> (conv + skip) -> pool -> head: clean rows of a second node are read through the owners too."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.relu(self.b(y) + y)
        return self.head(torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.mark.parametrize("make", [small_net, lambda: _Residual().eval()], ids=["chain", "residual"])
def test_image_position_pairs_equal_naive_loop(make):
    """(image, position) pairs, each image with its own positions in one call (the drill-down's batching), equal
    the definition: pair i is image owners[i] occluded at positions[i]."""
    model = make()
    g = torch.Generator().manual_seed(4)
    x, bases = torch.rand(3, 3, 16, 16, generator=g), torch.rand(3, 3, generator=g)
    ref = naive_logits(model, x, bases, 4, 1)
    engine = GraphOcclusion(model, "cpu", size=16, chunk=5)
    owners = np.array([2, 0, 1, 2, 0, 0, 1, 2, 2])
    pos = np.array([0, 168, 77, 77, 5, 5, 120, 13, 168])
    got = engine.logits(x, bases, 4, 1, positions=pos, owners=owners)
    assert got.shape == (1, len(pos), 10)
    assert (got[0] - ref[owners, pos]).abs().max() <= 1e-4 * (1 + ref.abs().max())
    with pytest.raises(ValueError, match=r"owners must lie in \[0, 3\)"):
        engine.logits(x, bases, 4, 1, positions=[0], owners=[3])
    with pytest.raises(ValueError, match="same length"):
        engine.logits(x, bases, 4, 1, positions=[0, 1], owners=[0])


def test_more_chunks_than_the_plan_cache_all_computed():
    """169 one-position chunks (more than PLAN_CACHE) with two workers configured: every position is computed
    (this path once computed only every other chunk and returned uninitialised rows for the rest)."""
    model = small_net()
    g = torch.Generator().manual_seed(3)
    x, bases = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, generator=g)
    ref = naive_logits(model, x, bases, 4, 1)
    got = GraphOcclusion(model, "cpu", size=16, chunk=2, workers=2).logits(x, bases, 4, 1)
    assert (got - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())


@pytest.mark.parametrize("coarse", [1, 2, 3, 4, 5])
def test_tau_zero_fp32_is_the_exact_map(coarse):
    model = small_net()
    g = torch.Generator().manual_seed(2)
    x, bases = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, generator=g)
    ref = naive_maps(model, x, bases, 3, 1)
    approx = ApproxOcclusion(model, "cpu", tau=0, coarse=coarse, precision="fp32", size=16)
    maps, info = approx.probability_maps(x, bases, 3, 1)
    assert maps.shape == ref.shape == (2, 14, 14)
    assert (maps - ref).abs().max() <= 1e-5
    assert info == {"mode": "approx", "tau": 0.0, "coarse": coarse, "precision": "fp32", "positions": 2 * 14 * 14,
                    "exact_positions": 2 * 14 * 14}


def test_flat_map_is_interpolated_not_computed():
    """A model whose output ignores the image: the map is flat, so only the coarse grid is computed and the fill
    equals the exact (constant) value."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 5)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
    x, bases = torch.rand(1, 3, 16, 16), torch.rand(1, 3)
    ref = naive_maps(model, x, bases, 3, 1)
    maps, info = approx_probability_maps(GraphOcclusion(model, "cpu", size=16), x, bases, 3, 1, tau=0.01, coarse=4)
    assert (maps - ref).abs().max() <= 1e-6
    assert info["exact_positions"] == 5 * 5  # rows and columns 0, 4, 8, 12, 13


def test_default_knobs_within_documented_error_on_net4():
    """Bundled net4, two real images, K=8, stride 1: the default approx map (drill-down + bf16 windows) is within
    0.01 mean abs error of the exact engine's map, computing fewer positions exactly (bf16 windows where the CPU
    has AMX, else fp32)."""
    from cifarbench.analysis.occlusion import load_image
    from cifarbench.zoo import load_model

    model = load_model("net4")
    x = torch.cat([load_image(EXAMPLES / f"{n}.png")[0][None] for n in ("cat", "ship")])
    bases = torch.full((2, 3), 0.5)
    exact = GraphOcclusion(model, "cpu").probability_maps(x, bases, 8, 1)
    maps, info = ApproxOcclusion(model, "cpu").probability_maps(x, bases, 8, 1)
    assert maps.shape == exact.shape == (2, 25, 25)
    assert float((maps - exact).abs().mean()) <= 0.01
    assert info["mode"] == "approx" and info["precision"] == default_precision("cpu")
    assert info["exact_positions"] < info["positions"] == 2 * 625


@pytest.mark.parametrize("tau,coarse,precision,message", [
    (-0.1, 4, "bf16", r"--tau must be a probability spread in \[0, 1\], got -0.1"),
    (float("nan"), 4, "bf16", r"--tau must be .* got nan"),
    (1.5, 4, "bf16", r"--tau must be .* got 1.5"),
    ("0.1", 4, "bf16", r"--tau must be .* got '0.1'"),
    (0.1, 0, "bf16", r"--coarse must be an integer step from 1 to 16, got 0"),
    (0.1, 2.5, "bf16", r"--coarse must be .* got 2.5"),
    (0.1, 17, "bf16", r"--coarse must be .* got 17"),
    (0.1, 4, "int4", r"approx precision must be one of fp32, bf16, got 'int4'"),
])
def test_bad_knobs_are_one_clear_value_error(tau, coarse, precision, message):
    with pytest.raises(ValueError, match=message) as info:
        check_knobs(tau, coarse, precision)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=message):
        ApproxOcclusion(small_net(), "cpu", tau=tau, coarse=coarse, precision=precision, size=16)


def test_bf16_only_where_measured():
    assert default_precision("cuda") == "fp32"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    assert default_precision("cpu") == ("bf16" if amx else "fp32")


def test_levels_nest():
    assert levels(4) == [4, 2, 1] and levels(6) == [6, 3, 1] and levels(5) == [5, 1] and levels(1) == [1]
