"""Approximate occlusion maps by adaptive drill-down over the exact graph engine, with knobs that bound the error.

Krypton (Nakandala et al., SIGMOD 2019) names two approximations: *projective-field thresholding* (propagate a
patch's change only part of its way) and *adaptive drill-down* (a coarse map first, then refine where it matters).
At 32 x 32 the first does not pay: on the bundled net4 it costs 0.045 mean abs error for a 3.5x FLOP saving
(issue 14's simulation), because a K=8 patch's projective field covers the whole map after two blocks. So this
module does only the second, and every value it reports is either exact (computed by
:class:`~cifarbench.kernels.incremental_graph.GraphOcclusion` for that very position) or a bilinear blend of four
exact-or-blended neighbours:

1. **Coarse grid.** The map's rows and columns at multiples of ``coarse`` (plus the last row and column) are
   computed exactly, for all images in one engine call (windows batched across images).
2. **Drill-down.** The grid's cells are visited level by level, the step halving (``coarse`` 4 -> 2 -> 1; an
   odd step goes straight to 1). A cell is refined when the *spread* (max - min, in probability units) of the
   map values on the grid points of the cell and of its eight neighbouring cells is at least ``tau``: the next
   level's grid points inside it are computed exactly (one engine call per image and level, the positions listed
   to :meth:`GraphOcclusion.logits`), else its inside is filled by bilinear interpolation of its four corners.
   Looking one cell beyond the cell itself catches a dip that starts just past a corner.

3. **Reduced-precision windows.** The exact positions are computed with the engine's windows in bfloat16
   (``precision="bf16"``, the default; the clean activations, the dense tail and the softmax stay float32). On a
   Xeon with AMX a net4 window conv runs 5-9x faster in bf16 than in fp32 and a whole net4 map about 3x faster,
   at 0.0006 mean / 0.012 max abs error on the bundled examples (measured 2026-12-01).

Knobs and what they trade (:func:`check_knobs` validates them; ``tau=0`` or ``coarse=1`` with
``precision="fp32"`` is the exact map):

* ``tau`` (default :data:`DEFAULT_TAU`): the spread below which a region is interpolated. Larger: fewer exact
  positions (faster), larger error where the map bends inside a flat-looking region. The default was chosen on
  real images (benchmarks/test_bench_approx.py's curve) so that the mean abs error stays <= 0.01 and the mean SSIM
  >= 0.95 against the exact maps.
* ``coarse`` (default :data:`DEFAULT_COARSE`): the first grid's step in map positions. Larger: a cheaper first
  pass, but features narrower than a cell between two coarse points can be missed entirely (no spread is seen),
  which ``tau`` cannot recover.
* ``precision`` (default :func:`default_precision`: ``"bf16"`` on a CPU with AMX, else ``"fp32"``): the
  windows' dtype. bf16 pays where the CPU has bf16 matrix units (``lscpu | grep amx_bf16``); elsewhere it can be
  slower than fp32, so it is not the default there.

Measured on the four bundled examples, net4, K=8, stride 1, bf16 windows, against the exact fp32 maps
(fraction of positions computed exactly / mean abs error / max abs error / mean SSIM):
coarse 4, tau 0.05: 0.78 / 0.0015 / 0.060 / 0.994; tau 0.1: 0.65 / 0.0031 / 0.143 / 0.977;
tau 0.2: 0.53 / 0.0057 / 0.458 / 0.951. Without the one-cell halo the fraction drops to 0.38 at tau 0.1 but the
SSIM to 0.89: at 32 px the maps are sharp, so the halo stays.

On 100 CIFAR-10 test images (benchmarks/test_bench_approx.py, 2026-12-02, quiet 2-core AMX Xeon, Captum 2.6 s
per map, exact fp32 engine 0.67 maps/s; drill-down calls batched across images, one engine call per level), as
(precision, coarse, tau): speed-up vs Captum / vs exact, mean SSIM (min), mean / max abs error:

* bf16, 2, 0.1 (the default): 12.1x / 6.9x, 0.988 (0.81), 0.0015 / 0.51
* bf16, 4, 0.1: 12.3x / 7.0x, 0.964 (0.72), 0.0026 / 0.79
* bf16, 4, 0.05: 11.3x / 6.4x, 0.975 (0.72), 0.0018 / 0.79
* bf16, 4, 0.2: 16.1x / 9.2x, 0.939 (0.46), 0.0047 / 0.85
* bf16, 1, 0 (bf16 windows only, every position exact): 9.5x / 5.4x, 1.000, 0.0006 / 0.015
* fp32, 4, 0.1: 3.7x / 2.1x, 0.964 (0.72), 0.0021 / 0.79 (so most of the speed is bf16's, the rest the drill-down)

The max errors are single positions of a narrow dip that no grid point of its cell or halo touched: ``tau`` cannot
see what the coarse grid missed, which is why the default coarse step is 2.

The cost is the fraction of positions computed exactly (``exact_positions`` / ``positions`` in the returned
info) times the exact engine's per-position cost, plus one clean forward pass per engine call.
"""
from __future__ import annotations

import math

import numpy as np
import torch

#: default spread (probability units) below which a region is interpolated: benchmarks/test_bench_approx.py
DEFAULT_TAU = 0.1
#: default first-grid step (map positions): on 100 test images coarse 2 kept SSIM 0.988 (min 0.81) at 12.1x Captum
#: where coarse 4 gave 0.964 (min 0.72) at 12.3x: the finer first grid misses fewer narrow features for ~2 % speed
DEFAULT_COARSE = 2
#: default dtype of the engine's recomputed windows where the CPU has AMX tiles (:func:`default_precision`)
DEFAULT_PRECISION = "bf16"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: cells around a cell whose grid points count towards its spread
HALO = 1
#: largest first-grid step accepted
MAX_COARSE = 16


def check_knobs(tau, coarse, precision: str = DEFAULT_PRECISION) -> tuple[float, int]:
    """``(tau, coarse)`` as float and int, or a ValueError with a one-line reason (the CLI turns it into its
    ``error:`` line)."""
    if isinstance(tau, (np.integer, np.floating)):
        tau = tau.item()  # np.float32(0.1), as K, stride and target take numpy scalars
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or not 0 <= tau <= 1:
        raise ValueError(f"--tau must be a probability spread in [0, 1], got {tau!r}")
    if isinstance(coarse, bool) or not isinstance(coarse, (int, np.integer)) or not 1 <= coarse <= MAX_COARSE:
        raise ValueError(f"--coarse must be an integer step from 1 to {MAX_COARSE}, got {coarse!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"approx precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return float(tau), int(coarse)


def default_precision(device=None) -> str:
    """``"bf16"`` on a CPU with AMX tiles (measured there: window convs 5-9x faster than fp32), else ``"fp32"``
    (bf16 on CPUs without bf16 matrix units, and on GPUs, is not measured here)."""
    if device is not None and torch.device(device).type != "cpu":
        return "fp32"
    try:
        return DEFAULT_PRECISION if torch.cpu._is_amx_tile_supported() else "fp32"
    except AttributeError:  # an older torch without the probe
        return "fp32"


def levels(coarse: int) -> list[int]:
    """Grid steps from ``coarse`` down to 1, each dividing the one before (so every grid contains the next's
    parent points): 4 -> [4, 2, 1], 6 -> [6, 3, 1], 5 -> [5, 1]."""
    steps = [coarse]
    while steps[-1] > 1:
        s = steps[-1]
        steps.append(s // 2 if s % 2 == 0 else 1)
    return steps


def _lines(n: int, step: int) -> np.ndarray:
    return np.array(sorted(set(range(0, n, step)) | {n - 1}), np.int64)


def _probabilities(engine, images, baselines, k, stride, targets, positions) -> np.ndarray:
    """``[B, len(positions)]`` exact target-class probabilities at row-major ``positions``."""
    logits = engine.logits(images, baselines, k, stride, positions=positions)
    probs = torch.softmax(logits.float(), -1)
    t = targets.view(-1, 1, 1).expand(-1, probs.shape[1], 1)
    return probs.gather(2, t)[..., 0].cpu().double().numpy()


def _pair_probabilities(engine, images, baselines, k, stride, targets, owners, positions) -> np.ndarray:
    """``[P]`` exact target-class probabilities of image ``owners[i]`` occluded at ``positions[i]``."""
    logits = engine.logits(images, baselines, k, stride, positions=positions, owners=owners)[0]
    probs = torch.softmax(logits.float(), -1)
    t = targets[torch.from_numpy(owners).to(targets.device)].view(-1, 1)
    return probs.gather(1, t)[:, 0].cpu().double().numpy()


def _fill(val: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> None:
    """Bilinear interpolation of the cell's four corners over its inside (corners kept)."""
    if r1 - r0 < 2 and c1 - c0 < 2:
        return
    a = (np.arange(r0, r1 + 1) - r0) / max(r1 - r0, 1)
    b = (np.arange(c0, c1 + 1) - c0) / max(c1 - c0, 1)
    top = val[r0, c0] * (1 - b) + val[r0, c1] * b
    bottom = val[r1, c0] * (1 - b) + val[r1, c1] * b
    block = top[None, :] * (1 - a[:, None]) + bottom[None, :] * a[:, None]
    # corners and the cell's edges that lie on computed lines keep their values: only unknown points are written
    sub = val[r0:r1 + 1, c0:c1 + 1]
    known = ~np.isnan(sub)
    sub[~known] = block[~known]


def approx_probability_maps(engine, images: torch.Tensor, baselines: torch.Tensor, k: int, stride: int = 1,
                            targets: torch.Tensor | None = None, tau: float = DEFAULT_TAU,
                            coarse: int = DEFAULT_COARSE) -> tuple[torch.Tensor, dict]:
    """Approximate target-class probability maps ``[B, H', W']`` (as ``engine.probability_maps``) and an info
    dict ``{"mode": "approx", "tau", "coarse", "positions", "exact_positions"}`` (positions over all images).

    ``engine``: a :class:`~cifarbench.kernels.incremental_graph.GraphOcclusion` (anything with its
    ``logits(images, baselines, k, stride, positions=)``). ``targets`` default: each image's clean prediction."""
    tau, coarse = check_knobs(tau, coarse)
    images = images.to(engine.device, torch.float32)
    n_img, _, h, w = images.shape
    nh, nw = (h - k) // stride + 1, (w - k) // stride + 1
    if targets is None:
        with torch.inference_mode():
            targets = engine.module(images).argmax(1)
    targets = torch.as_tensor(targets, device=engine.device).view(-1)
    val = np.full((n_img, nh, nw), np.nan)
    steps = levels(coarse)
    rows, cols = _lines(nh, steps[0]), _lines(nw, steps[0])
    first = (rows[:, None] * nw + cols[None, :]).reshape(-1)
    val.reshape(n_img, -1)[:, first] = _probabilities(engine, images, baselines, k, stride, targets, first)
    exact = n_img * len(first)
    cells = [[(i, j) for i in range(len(rows) - 1) for j in range(len(cols) - 1)] for _ in range(n_img)]
    for level in range(len(steps) - 1):
        # every image's cells are judged first, then all images' new points are computed in one engine call
        # ((image, position) pairs): per-image calls lost the cross-image batching and repeated the clean pass
        nxt = steps[level + 1]
        frows, fcols = _lines(nh, nxt), _lines(nw, nxt)
        owners, wanted = [], []
        for b in range(n_img):
            v = val[b]
            refine = []
            for i, j in cells[b]:
                # spread over this cell's and its eight neighbours' grid points at this level
                rr = rows[max(i - HALO, 0):i + 2 + HALO]
                cc = cols[max(j - HALO, 0):j + 2 + HALO]
                block = v[np.ix_(rr, cc)]
                if tau > 0 and np.nanmax(block) - np.nanmin(block) < tau:
                    _fill(v, rows[i], rows[i + 1], cols[j], cols[j + 1])
                else:
                    refine.append((i, j))
            # the next level's points inside refined cells not known yet, and the next level's cells
            want = np.zeros((nh, nw), bool)
            new_cells = set()
            for i, j in refine:
                r0, r1, c0, c1 = rows[i], rows[i + 1], cols[j], cols[j + 1]
                ri = np.flatnonzero((frows >= r0) & (frows <= r1))
                ci = np.flatnonzero((fcols >= c0) & (fcols <= c1))
                want[np.ix_(frows[ri], fcols[ci])] = True
                new_cells.update((a, c) for a in ri[:-1] for c in ci[:-1])
            want &= np.isnan(v)
            pos = np.flatnonzero(want.reshape(-1))
            owners.append(np.full(len(pos), b, np.int64))
            wanted.append(pos)
            cells[b] = sorted(new_cells)
        owners, wanted = np.concatenate(owners), np.concatenate(wanted)
        if len(wanted):
            val.reshape(n_img, -1)[owners, wanted] = _pair_probabilities(engine, images, baselines, k, stride,
                                                                         targets, owners, wanted)
            exact += len(wanted)
        rows, cols = frows, fcols
    # points of refined last-level cells are all known; anything still unknown lies in no cell (cannot happen)
    assert not np.isnan(val).any(), "drill-down left a position without a value"
    precision = {v: k for k, v in PRECISIONS.items()}.get(getattr(engine, "window_dtype", torch.float32), "?")
    info = {"mode": "approx", "tau": tau, "coarse": coarse, "precision": precision, "positions": n_img * nh * nw,
            "exact_positions": exact}
    return torch.from_numpy(val.astype(np.float32)), info


class ApproxOcclusion:
    """The approximate mode as one object: ``ApproxOcclusion(module, device=None, tau=DEFAULT_TAU,
    coarse=DEFAULT_COARSE, precision=None, size=32, **engine_options)`` (``precision`` None:
    :func:`default_precision` for the device) builds a
    :class:`~cifarbench.kernels.incremental_graph.GraphOcclusion` with windows in ``precision`` (raises its
    :class:`~cifarbench.kernels.graph.UnsupportedOp` for a graph it cannot run) and
    ``probability_maps(images, baselines, k, stride=1, targets=None)`` returns ``(maps [B, H', W'], info)``."""

    def __init__(self, module, device=None, tau: float = DEFAULT_TAU, coarse: int = DEFAULT_COARSE,
                 precision: str | None = None, size=32, **engine_options):
        from .incremental_graph import GraphOcclusion

        if precision is None:
            precision = default_precision(device)
        self.tau, self.coarse = check_knobs(tau, coarse, precision)
        self.precision = precision
        self.engine = GraphOcclusion(module, device, size=size, window_dtype=PRECISIONS[precision],
                                     **engine_options)

    def knobs(self) -> dict:
        return {"tau": self.tau, "coarse": self.coarse, "precision": self.precision}

    def probability_maps(self, images, baselines, k: int, stride: int = 1, targets=None):
        return approx_probability_maps(self.engine, images, baselines, k, stride, targets, self.tau, self.coarse)
