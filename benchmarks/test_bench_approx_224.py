"""The approximate mode at 224 x 224 (issue 14: VGG-16 >= 15x and resnet18 >= 6x Captum, each with mean SSIM >= 0.95
against the exact maps): torchvision VGG-16 and timm resnet18 with random weights (seed 0), K=32, stride 16 (a 13 x
13 map), on the bundled example images resized to 224 x 224 (bilinear), one target each (its clean prediction); the
logits scaled by a constant so the softmax is as confident as a trained net's (:func:`_confident`).

In one run, per net: Captum's ``Occlusion`` (softmax-wrapped eager model) on the first image at each
``perturbations_per_eval`` of :data:`PPE` (its best counts, per map), the exact fp32 graph engine on every image
(the reference maps and the exact speed), then each knob of :data:`CURVE` on the same images; SSIM from
scikit-image, with ``data_range=1`` (the issue's measure) and with each exact map's own range (random-weight
nets give nearly flat probability maps, on which the first is 1.0 whatever the approximation does). The table goes
to ``extra_info["curve"]`` and stdout.

    CIFARBENCH_BENCH_BIG=1 pytest benchmarks/test_bench_approx_224.py -s --benchmark-json=approx224.json

Opt-in (minutes: a VGG-16 Captum map is about a minute on 2 cores). ``CIFARBENCH_APPROX_224_IMAGES`` (default 2)
sets the image count.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bench_graph_occlusion import _big_model  # the same random-weight nets as the exact benchmark

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BIG = os.environ.get("CIFARBENCH_BENCH_BIG") == "1"
IMAGES = int(os.environ.get("CIFARBENCH_APPROX_224_IMAGES", "2"))
SIZE, K, STRIDE = 224, 32, 16
N = (SIZE - K) // STRIDE + 1
PPE = (16, 64)
#: logit spread over the classes that the random nets are scaled to (see :func:`_confident`)
LOGIT_STD = 4.0
#: (precision, coarse, tau); coarse 1 with tau 0 is "reduced-precision windows only" (every position computed)
CURVE = (("bf16", 1, 0.0), ("bf16", 2, 0.1), ("bf16", 2, 0.05), ("bf16", 4, 0.1), ("fp32", 2, 0.1))


class _Scaled(torch.nn.Module):
    def __init__(self, model, scale: float):
        super().__init__()
        self.model, self.scale = model, float(scale)

    def forward(self, x):
        return self.model(x) * self.scale


def _confident(model, x: torch.Tensor):
    """The random-weight net with its logits multiplied by one constant so their spread over the classes is
    :data:`LOGIT_STD` on these images, as a trained net's is. Without it the softmax of a random VGG-16 is nearly
    uniform and an occlusion map's range is ~1e-5: flat maps that any approximation matches (SSIM 1.0), which
    measures nothing. The scale is a constant in the dense tail: the engines' work is unchanged."""
    with torch.no_grad():
        spread = float(model(x).std(dim=1).mean())
    return _Scaled(model, LOGIT_STD / max(spread, 1e-12)).eval()


def _images(n: int) -> torch.Tensor:
    from cifarbench.analysis.occlusion import load_image

    files = sorted(EXAMPLES.glob("*.png"))[:n]
    x = torch.cat([load_image(f)[0][None] for f in files])
    return torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)


@pytest.mark.skipif(not BIG, reason="set CIFARBENCH_BENCH_BIG=1 (VGG-16 / resnet18 at 224x224, minutes per run)")
@pytest.mark.benchmark(group="approx-224-k32-s16")
@pytest.mark.parametrize("net", ["vgg16", "resnet18"])
def test_approx_curve_224(benchmark, record, device, net):
    from captum.attr import Occlusion
    from skimage.metrics import structural_similarity

    from cifarbench.kernels.approx import approx_probability_maps
    from cifarbench.kernels.incremental_graph import GraphOcclusion

    x = _images(IMAGES).to(device)
    model = _confident(_big_model(net), x).to(device)
    bases = torch.full((len(x), 3), 0.5)
    with torch.no_grad():
        targets = model(x).argmax(1)
    occ = Occlusion(torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval())
    captum = {}
    for ppe in PPE:
        start = time.perf_counter()
        with torch.no_grad():
            occ.attribute(x[:1], sliding_window_shapes=(3, K, K), strides=(3, STRIDE, STRIDE), baselines=0.5,
                          target=int(targets[0]), perturbations_per_eval=ppe)
        captum[ppe] = time.perf_counter() - start
    t_captum = min(captum.values())
    exact_engine = GraphOcclusion(model, device, size=SIZE)
    exact_engine.probability_maps(x[:1], bases[:1], K, STRIDE, targets[:1])  # warm: plans, buffers
    exact = benchmark.pedantic(lambda: exact_engine.probability_maps(x, bases, K, STRIDE, targets), rounds=1,
                               warmup_rounds=0).cpu().numpy()
    t_exact = benchmark.stats.stats.median / len(x)
    engines = {"fp32": exact_engine, "bf16": GraphOcclusion(model, device, size=SIZE, window_dtype=torch.bfloat16)}
    engines["bf16"].probability_maps(x[:1], bases[:1], K, STRIDE, targets[:1])
    rows = []
    for precision, coarse, tau in CURVE:
        start = time.perf_counter()
        maps, info = approx_probability_maps(engines[precision], x, bases, K, STRIDE, targets, tau, coarse)
        per_map = (time.perf_counter() - start) / len(x)
        maps = maps.numpy()
        err = np.abs(maps - exact)
        ssim = [structural_similarity(maps[i], exact[i], data_range=1.0, win_size=7) for i in range(len(x))]
        # random-weight nets give nearly flat probability maps (a range of 1e-4 is common), on which SSIM with
        # data_range=1 is 1.0 whatever the approximation does: also judged on each exact map's own range
        ranges = [max(float(exact[i].max() - exact[i].min()), 1e-12) for i in range(len(x))]
        ssim_rel = [structural_similarity(maps[i], exact[i], data_range=ranges[i], win_size=7) for i in range(len(x))]
        rel_err = [float(np.abs(maps[i] - exact[i]).mean()) / ranges[i] for i in range(len(x))]
        rows.append({"precision": precision, "coarse": coarse, "tau": tau,
                     "exact_fraction": round(info["exact_positions"] / info["positions"], 3),
                     "speedup_vs_captum": round(t_captum / per_map, 2), "speedup_vs_exact": round(t_exact / per_map, 2),
                     "mean_ssim": round(float(np.mean(ssim)), 4), "min_ssim": round(float(np.min(ssim)), 4),
                     "mean_abs_error": round(float(err.mean()), 5), "max_abs_error": round(float(err.max()), 4),
                     "map_range": float(f"{np.mean(ranges):.3g}"),
                     "mean_ssim_on_range": round(float(np.mean(ssim_rel)), 4),
                     "min_ssim_on_range": round(float(np.min(ssim_rel)), 4),
                     "mean_error_of_range": round(float(np.mean(rel_err)), 4)})
    record(images=len(x) * N * N, net=net, captum_s_per_map=round(t_captum, 2),
           captum_ppe_scan_s={str(p): round(t, 2) for p, t in captum.items()}, exact_s_per_map=round(t_exact, 3),
           exact_speedup_vs_captum=round(t_captum / t_exact, 2), curve=rows)
    print(f"\n{net} 224x224 K={K} stride {STRIDE}, {len(x)} images: Captum {t_captum:.2f} s/map (best of "
          f"{captum}), exact {t_exact:.2f} s/map ({t_captum / t_exact:.2f}x)")
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))
