"""Triton kernels for the GPU occlusion path, each with a torch fallback that computes the same thing.

* :func:`occluded_batch`: image(s) + patch positions -> the occluded batch, built on the device (no host copies).
* :func:`first_layer_windows`: the incremental engine's first layer fused: for each patch position, the conv1
  window around the patch, reading the clean image and painting the patch on the fly (no occluded copy is ever
  materialised), + bias + ReLU, written straight into the engine's NHWC window buffer.

The Triton versions run on CUDA tensors, or anywhere under Triton's interpreter (``TRITON_INTERPRET=1``), which
is how CI checks them against torch without a GPU. ``triton`` is imported only when a kernel is used, so
CPU-only installs without it work.
"""
from __future__ import annotations

import os
from functools import cache

import torch
import torch.nn.functional as F


@cache
def available() -> bool:
    """Triton is importable (and the kernels can run: on CUDA, or anywhere with ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _use_triton(t: torch.Tensor) -> bool:
    return available() and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


#: ``triton.language``, bound on first use; a module global so Triton's interpreter can patch it inside kernels
tl = None


@cache
def _kernels():
    global tl
    import triton
    import triton.language

    tl = triton.language

    @triton.jit
    def occlude(img, base, out, P, p0, n, k, stride, H: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # one (image, position, channel) plane per program
        c = row % 3
        bp = row // 3
        p = bp % P + p0
        b = bp // P
        y0 = (p // n) * stride
        x0 = (p % n) * stride
        offs = tl.arange(0, BLOCK)
        m = offs < H * W
        yy = offs // W
        xx = offs % W
        inside = (yy >= y0) & (yy < y0 + k) & (xx >= x0) & (xx < x0 + k)
        v = tl.load(img + (b * 3 + c) * H * W + offs, mask=m, other=0.0)
        bv = tl.load(base + b * 3 + c)
        tl.store(out + row * H * W + offs, tl.where(inside, bv, v), mask=m)

    @triton.jit
    def conv1_windows(x, base, w, bias, boxes, out, n_win, h, wd, k, s, q, cout,
                      H: tl.constexpr, CIN: tl.constexpr, KS: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_C: tl.constexpr):
        wi = tl.program_id(0)  # window (image-major), as the engine lays out its buffers
        b = wi // n_win
        r = wi % n_win
        r0 = tl.load(boxes + r * 4)
        c0 = tl.load(boxes + r * 4 + 1)
        py = tl.load(boxes + r * 4 + 2)
        px = tl.load(boxes + r * 4 + 3)
        pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = pix < h * wd
        oy = r0 + pix // wd
        ox = c0 + pix % wd
        co = tl.arange(0, BLOCK_C)
        cm = co < cout
        acc = tl.full((BLOCK_P, BLOCK_C), 0.0, tl.float32)
        for ci in tl.static_range(CIN):
            bv = tl.load(base + b * CIN + ci)
            for kh in tl.static_range(KS):
                for kw in tl.static_range(KS):
                    iy = oy * s - q + kh
                    ix = ox * s - q + kw
                    valid = pm & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < H)
                    v = tl.load(x + ((b * CIN + ci) * H + iy) * H + ix, mask=valid, other=0.0)
                    patch = valid & (iy >= py) & (iy < py + k) & (ix >= px) & (ix < px + k)
                    v = tl.where(patch, bv, v)
                    wv = tl.load(w + ((co * CIN + ci) * KS + kh) * KS + kw, mask=cm, other=0.0)
                    acc += v[:, None] * wv[None, :]
        acc += tl.load(bias + co, mask=cm, other=0.0)[None, :]
        acc = tl.maximum(acc, 0.0)
        dst = out + (wi * h * wd + pix)[:, None] * cout + co[None, :]
        tl.store(dst, acc, mask=pm[:, None] & cm[None, :])

    return occlude, conv1_windows


def _positions(n: int, stride: int, p0: int, p1: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.arange(p0, p1, device=device)
    return (p // n) * stride, (p % n) * stride


def occluded_batch_torch(images: torch.Tensor, baselines: torch.Tensor, k: int, stride: int, p0: int,
                         p1: int) -> torch.Tensor:
    """``[B * (p1 - p0), 3, H, W]``, image-major: positions ``p0..p1`` (row-major) of each image patched with
    its baseline colour. One broadcast ``where``: no loop over positions."""
    b, c, h, w = images.shape
    n = (h - k) // stride + 1
    ys, xs = _positions(n, stride, p0, p1, images.device)
    ar = torch.arange(h, device=images.device)
    rows = (ar >= ys[:, None]) & (ar < ys[:, None] + k)
    cols = (ar[:w] >= xs[:, None]) & (ar[:w] < xs[:, None] + k)
    mask = rows[:, None, :, None] & cols[:, None, None, :]
    out = torch.where(mask[None], baselines[:, None, :, None, None].to(images.dtype), images[:, None])
    return out.reshape(-1, c, h, w)


def occluded_batch(images: torch.Tensor, baselines: torch.Tensor, k: int, stride: int, p0: int,
                   p1: int) -> torch.Tensor:
    """:func:`occluded_batch_torch`, by the Triton kernel on CUDA (or under ``TRITON_INTERPRET=1``)."""
    if not (_use_triton(images) and images.dtype == torch.float32):
        return occluded_batch_torch(images, baselines, k, stride, p0, p1)
    import triton

    images, baselines = images.contiguous(), baselines.to(images).contiguous()
    b, c, h, w = images.shape
    n = (h - k) // stride + 1
    out = torch.empty(b * (p1 - p0), c, h, w, device=images.device, dtype=images.dtype)
    occlude, _ = _kernels()
    occlude[(out.shape[0] * c,)](images, baselines, out, p1 - p0, p0, n, k, stride, H=h, W=w,
                                 BLOCK=triton.next_power_of_2(h * w))
    return out


def first_layer_windows_torch(x: torch.Tensor, base: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              boxes: torch.Tensor, h: int, w: int, k: int, s: int, q: int,
                              out: torch.Tensor) -> None:
    """Reference for :func:`first_layer_windows`: occlude whole images, run the dense conv, crop the windows."""
    n_img, n_win = len(x), len(boxes)
    boxes = boxes.long()
    ar = torch.arange(x.shape[2], device=x.device)
    rows = (ar >= boxes[:, 2:3]) & (ar < boxes[:, 2:3] + k)
    cols = (ar >= boxes[:, 3:4]) & (ar < boxes[:, 3:4] + k)
    mask = rows[:, None, :, None] & cols[:, None, None, :]
    occluded = torch.where(mask[None], base[:, None, :, None, None], x[:, None]).flatten(0, 1)
    y = F.relu(F.conv2d(occluded, weight, bias, stride=s, padding=q))
    yi = (boxes[:, 0:1] + torch.arange(h, device=x.device)).repeat(n_img, 1)
    xi = (boxes[:, 1:2] + torch.arange(w, device=x.device)).repeat(n_img, 1)
    idx = torch.arange(n_img * n_win, device=x.device)[:, None, None]
    crops = y.permute(0, 2, 3, 1)[idx, yi[:, :, None], xi[:, None, :]]
    out.copy_(crops.reshape(-1, weight.shape[0]))


def first_layer_windows(x: torch.Tensor, base: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        boxes: torch.Tensor, h: int, w: int, k: int, s: int, q: int, out: torch.Tensor) -> None:
    """Fused occlusion + conv1 + bias + ReLU on the windows of one group, into ``out`` ``[B*n*h*w, Cout]`` rows.

    ``x``: normalized clean images ``[B, Cin, H, H]``; ``base``: normalized patch colours ``[B, Cin]``;
    ``boxes``: ``[n, 4]`` int32 (window row, window col, patch row, patch col), as
    :class:`cifarbench.kernels.incremental.Step` holds them; ``k``: patch size; ``s``, ``q``: conv stride, padding.
    """
    if not _use_triton(x):
        return first_layer_windows_torch(x, base, weight, bias, boxes, h, w, k, s, q, out)
    import triton

    cout, cin, ks, _ = weight.shape
    block_p = min(128, triton.next_power_of_2(h * w))
    conv1, = _kernels()[1:]
    grid = (len(x) * len(boxes), triton.cdiv(h * w, block_p))
    conv1[grid](x.contiguous(), base.contiguous(), weight.contiguous(), bias.contiguous(), boxes.contiguous(), out,
                len(boxes), h, w, k, s, q, cout, H=x.shape[2], CIN=cin, KS=ks, BLOCK_P=block_p,
                BLOCK_C=triton.next_power_of_2(cout))
