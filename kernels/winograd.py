"""Winograd F(2x2, 3x3) convolution for the incremental engines' windows on the CPU (Lavin & Gray, CVPR 2016).

Why: at 32x32 the exact engine is FLOP-bound. On net4 at K=8 its plan does half of dense's FLOPs, and oneDNN's
direct convolution already runs them near the core's fp32 peak (~150 GFLOP/s per core with AVX-512). What is
left is to do fewer multiplications. F(2x2, 3x3) computes each 2x2 output tile of a 3x3 stride-1 convolution
from a 4x4 input tile with 16 multiplications per (input, output) channel pair, where the direct method uses
36: 2.25x fewer. The price is two elementwise transforms and a larger GEMM operand, which pay when the channel
counts make the GEMM dominate (net4's 64- to 512-channel layers).

How, on NHWC windows ``x`` ``[R, H, W, C]`` (``H = h + 2``, ``W = w + 2``):

* input transform ``V = B^T d B`` of every 4x4 tile (stride 2), as 8 elementwise ops on strided views of ``x``,
  into a ``[16, tiles, C]`` buffer;
* 16 GEMMs ``M[a] = V[a] @ U[a]`` in one ``bmm``, ``U = G g G^T`` ``[16, C, Cout]`` precomputed from the weights
  in float64;
* output transform ``Y = A^T M A`` as one ``[4, 16] x [16, tiles * Cout]`` GEMM (``kron(A^T, A^T)``), then
  one pass writing the 2x2 tiles (ReLU fused) into the caller's NHWC output; the bias enters as
  ``M[1][1] += b`` (``A^T``'s column 1 is all ones, so it reaches every output once).

Exactness: F(2x2, 3x3)'s transforms have entries 0, +-1 and 1/2 only, so its rounding error is of the order of
the direct method's (measured on net4-sized layers against float64: 2.3e-6 here, 5.3e-6 for oneDNN's direct
convolution); the maps equal the naive loop's within the engines' 1e-5 (tests). F(4x4, 3x3) would save 4x but
its transforms (entries up to 8 and 1/24) lose ~10x more precision, too much for an engine called exact.

Buffers are the caller's per-worker scratch (``dict``), reused between calls: fresh multi-megabyte tensors cost a
page fault per 4 KiB and made the GEMM 30 % slower in a first prototype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .scratch import scratch_buffer

# F(2x2, 3x3) (Lavin & Gray, eq. 7)
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_AT = torch.tensor(((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0)))
#: ``kron(A^T, A^T)``, ``[(i, j), (a, b)]``: ``Y[i][j] = sum A^T[i][a] M[a][b] A^T[j][b]`` for all tiles at once
_A_KRON = torch.kron(_AT, _AT)

#: the smallest input channel count Winograd runs with: below it the transforms cost more than the GEMM saves
#: (one thread, net4-sized windows: 256 channels 1.5-1.65x faster, 128 even, 64 0.8x, 32 0.5x)
MIN_CHANNELS = 128
#: tiles per GEMM (whole windows of them; one window bigger than this is one GEMM): keeps the transforms' operands
#: in the caches (16 x 128 x 512 floats = 4 MiB). One thread, net4 at K=8, per map: 32 tiles 0.99 s, 64 0.78 s,
#: 128 0.70 s, 192 0.70 s, 256 0.72 s, 1024 0.76 s
MAX_TILES = 128


def fits(weight: torch.Tensor, stride, dilation, groups: int) -> bool:
    """Whether a conv with these parameters runs here: fp32 on the CPU, 3x3, stride 1, no dilation, no groups,
    at least :data:`MIN_CHANNELS` input channels."""
    pairs = [tuple(v) if isinstance(v, (tuple, list)) else (v, v) for v in (stride, dilation)]
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and tuple(weight.shape[2:]) == (3, 3)
            and pairs[0] == (1, 1) and pairs[1] == (1, 1) and groups == 1 and weight.shape[1] >= MIN_CHANNELS)


class Winograd3x3:
    """A 3x3 stride-1 conv (``weight`` ``[Cout, C, 3, 3]``, ``bias`` ``[Cout]`` or None) on NHWC windows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        g = torch.tensor(_G, dtype=torch.float64)
        u = torch.einsum("ai,ocij,bj->abco", g, weight.detach().double().cpu(), g)
        self.c_in, self.c_out = weight.shape[1], weight.shape[0]
        self.u = u.reshape(16, self.c_in, self.c_out).float().contiguous()
        self.bias = None if bias is None else bias.detach().float().cpu().contiguous()

    def __call__(self, x: torch.Tensor, out: torch.Tensor, scratch: dict, relu: bool = False) -> None:
        """``out`` ``[R, H - 2, W - 2, Cout]`` (any strides) = the conv of NHWC ``x`` ``[R, H, W, C]`` + bias,
        through a ReLU if ``relu``."""
        r, hh, ww, c = x.shape
        h, w = hh - 2, ww - 2
        th, tw = (h + 1) // 2, (w + 1) // 2
        step = max(1, MAX_TILES // (th * tw))
        if r > step:
            for r0 in range(0, r, step):
                self(x[r0:r0 + step], out[r0:r0 + step], scratch, relu)
            return
        if (h % 2, w % 2) != (0, 0):  # odd outputs: one zero row/column of input completes the last tile
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        n = r * th * tw
        # input transform, rows then columns: t[a] = (B^T d)[a] over tile rows; v[a][b] = (t[a] B)[b]
        t = _scratch(scratch, "wg_t", (4, r, th, 2 * tw + 2, c))
        xs = [x[:, i:i + 2 * th:2] for i in range(4)]
        torch.sub(xs[0], xs[2], out=t[0])
        torch.add(xs[1], xs[2], out=t[1])
        torch.sub(xs[2], xs[1], out=t[2])
        torch.sub(xs[1], xs[3], out=t[3])
        v = _scratch(scratch, "wg_v", (16, n, c))
        vv = v.view(4, 4, r, th, tw, c)
        es = [t[:, :, :, j:j + 2 * tw:2] for j in range(4)]
        torch.sub(es[0], es[2], out=vv[:, 0])
        torch.add(es[1], es[2], out=vv[:, 1])
        torch.sub(es[2], es[1], out=vv[:, 2])
        torch.sub(es[1], es[3], out=vv[:, 3])
        m = _scratch(scratch, "wg_m", (16, n, self.c_out))
        torch.bmm(v, self.u, out=m)
        mm = m.view(4, 4, r, th, tw, self.c_out)
        if self.bias is not None:
            mm[1, 1].add_(self.bias)
        # output transform Y = A^T M A of all tiles as one [4, 16] x [16, tiles * Cout] GEMM (a third of the
        # memory traffic of elementwise ops on M), then one pass that writes the 2x2 tiles (with the ReLU) out
        y4 = _scratch(scratch, "wg_y4", (4, n * self.c_out))
        torch.mm(_A_KRON, m.view(16, -1), out=y4)
        y4 = y4.view(2, 2, r, th, tw, self.c_out)
        direct = (h % 2, w % 2) == (0, 0) and out.is_contiguous()
        y = out if direct else _scratch(scratch, "wg_y", (r, 2 * th, 2 * tw, self.c_out))
        tiles = y.view(r, th, 2, tw, 2, self.c_out).permute(2, 4, 0, 1, 3, 5)  # [i, j, R, th, tw, Cout]
        if relu:
            torch.clamp_min(y4, 0, out=tiles)
        else:
            tiles.copy_(y4)
        if not direct:
            out.copy_(y[:, :h, :w])


def _scratch(scratch: dict, key: str, shape: tuple) -> torch.Tensor:
    """A float32 CPU buffer of ``shape`` from the worker's scratch (:func:`.scratch.scratch_buffer`)."""
    return scratch_buffer(scratch, key, shape, torch.float32)[0]
