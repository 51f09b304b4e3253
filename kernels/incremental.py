"""Exact incremental occlusion: recompute only what a patch can change (after Krypton, SIGMOD 2019).

A K x K patch changes a small rectangle of the input; each layer's changed rectangle grows by the layer's kernel
and shrinks by its stride, clipped to the map. The engine runs the clean image once, keeps every layer's
activation, and for each patch position recomputes only a window of each layer that covers the changed rectangle.

How it stays fast (the overhead that sank a naive prototype is window assembly, not arithmetic):

* Every layer keeps one buffer of rows ``[zero row | clean activations (NHWC) | recomputed windows (NHWC)]``.
  The input of every window of the next layer is **one** ``index_select`` of rows from that buffer, with an
  index computed once per (net geometry, K, stride) and cached: it points at the recomputed window where the
  previous layer was recomputed, at the clean activation elsewhere, and at the zero row for padding. No
  scatter, no per-position Python, and the gather lands directly in channels-last layout.
* Windows are batched per layer in a few size groups (window sizes per axis rounded up to at most ``buckets``
  values, windows shifted to stay inside the map), so each layer is a handful of large convolutions on oneDNN /
  cuDNN with padding 0 (padding is the zero row). Exact per-position sizes would save a few more FLOPs but
  multiply the number of small convs; three buckets keep ~95 % of the saving.
* BN is folded into the convs (``kernels.bn_fold``) and ReLU writes straight into the next buffer.
* Where a layer's windows cover the whole map the same code is plain dense evaluation from that layer on.
* On the CPU, position chunks run on one worker thread per core, each single-threaded, and each worker keeps its
  buffers between chunks and calls (fresh ones cost ~90,000 page faults per net4 map).

The result is exact: every recomputed value reads exactly the inputs a dense pass would read, so the maps equal
the dense engine's up to float summation order.
"""
from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bn_fold import folded_conv_params
from .scratch import scratch_buffer
from .winograd import Winograd3x3
from .winograd import fits as winograd_fits

IMAGE_SIZE = 32


@dataclass(frozen=True)
class LayerSpec:
    """One body layer: conv (folded BN, ReLU after) or 2x2 max-pool; sizes of its input and output maps."""

    kind: str
    k: int
    s: int
    q: int
    s_in: int
    s_out: int
    c_in: int
    c_out: int


@dataclass(frozen=True)
class Group:
    """Windows of one output size ``h x w`` at one layer: ``n`` per image, input rows ``[start, start + B*n*hin*win)``
    of the layer's gather index, output rows ``[out, ...)`` of the layer's recomputed part."""

    h: int
    w: int
    hin: int
    win: int
    n: int
    start: int
    out: int


@dataclass(frozen=True)
class Step:
    """One layer: its gather index into the previous buffer, its window groups, and per group the windows as
    ``[n, 4]`` int32 rows (output row start, output col start, patch row, patch col) for fused kernels."""

    layer: LayerSpec
    groups: tuple[Group, ...]
    index: torch.Tensor
    tail_rows: int
    windows: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Plan:
    """Everything that depends only on geometry, K, stride, the position range and the image count."""

    steps: tuple[Step, ...]
    head_index: torch.Tensor
    images: int
    positions: int
    flops: int


def layer_specs(model) -> tuple[LayerSpec, ...]:
    """The body of a :class:`~cifarbench.nets.CifarNet` as :class:`LayerSpec` s."""
    from ..nets import ConvBlock

    specs, size, ch = [], IMAGE_SIZE, 3
    for layer in model.layers.children():
        if isinstance(layer, ConvBlock):
            c = layer.conv
            k, s, q, cout = c.kernel_size[0], c.stride[0], c.padding[0], c.out_channels
            kind = "conv"
        elif isinstance(layer, nn.MaxPool2d):
            k, s, q, cout, kind = 2, 2, 0, ch, "pool"
        else:
            raise TypeError(f"incremental occlusion does not handle {type(layer).__name__}")
        out = (size + 2 * q - k) // s + 1
        specs.append(LayerSpec(kind, k, s, q, size, out, ch, cout))
        size, ch = out, cout
    return tuple(specs)


def _changed(lo: np.ndarray, hi: np.ndarray, ly: LayerSpec) -> tuple[np.ndarray, np.ndarray]:
    """Output range ``[lo, hi)`` whose receptive input range meets the changed input range ``[lo, hi)``; empty
    (``hi == lo``) when no output reads the changed inputs (strided convs skip the last rows of odd maps)."""
    lo_o = np.minimum(np.maximum(0, -((-(lo + ly.q - ly.k + 1)) // ly.s)), ly.s_out)
    hi_o = np.minimum(ly.s_out, (hi - 1 + ly.q) // ly.s + 1)
    return lo_o, np.where(hi <= lo, lo_o, np.maximum(hi_o, lo_o))


def _round_up(sizes: np.ndarray, buckets: int) -> np.ndarray:
    """Round sizes up to at most ``buckets`` distinct values, choosing the values that minimise the mean."""
    values = sorted(set(sizes.tolist()))
    if len(values) <= buckets:
        return sizes
    best, best_mean = sizes, None
    for cut in itertools.combinations(values[:-1], buckets - 1):
        allowed = np.array(list(cut) + [values[-1]])
        rounded = allowed[np.searchsorted(allowed, sizes)]
        if best_mean is None or rounded.mean() < best_mean:
            best, best_mean = rounded, rounded.mean()
    return best


def axis_windows(specs: tuple[LayerSpec, ...], k: int, stride: int, buckets: int):
    """Per layer (index 0 = the input), per patch position along one axis: window start and size."""
    starts = np.arange((IMAGE_SIZE - k) // stride + 1) * stride
    lo, hi = starts.copy(), starts + k
    windows = [(starts, np.full_like(starts, k))]
    for ly in specs:
        lo, hi = _changed(lo, hi, ly)
        size = _round_up(hi - lo, buckets)
        windows.append((np.minimum(lo, ly.s_out - size), size))
    return windows


@lru_cache(maxsize=64)
def build_plan(specs: tuple[LayerSpec, ...], k: int, stride: int, p0: int, p1: int, images: int,
               buckets: int = 3, device: str = "cpu") -> Plan:
    """Gather indices and conv groups for positions ``[p0, p1)`` (row-major over the map) of ``images`` images."""
    windows = axis_windows(specs, k, stride, buckets)
    n = len(windows[0][0])
    pos = np.arange(p0, p1)
    pi, pj = pos // n, pos % n
    npos = len(pos)
    # where window (b, p) of the previous layer starts in its buffer's recomputed part: base + b * bstride
    tail_base, tail_bstride = np.zeros(npos, np.int64), np.ones(npos, np.int64)
    steps, flops = [], 0
    for li, ly in enumerate(specs, start=1):
        (ar, hr), (pa, ph) = windows[li], windows[li - 1]
        clean_rows = images * ly.s_in ** 2
        pieces, groups, cursor, out, boxes = [], [], 0, 0, []
        new_base, new_bstride = np.zeros(npos, np.int64), np.zeros(npos, np.int64)
        sizes = np.stack([hr[pi], hr[pj]], 1)
        for h, w in sorted({tuple(x) for x in sizes.tolist()}):
            sel = np.flatnonzero((sizes[:, 0] == h) & (sizes[:, 1] == w))
            hin, win = ((h - 1) * ly.s + ly.k, (w - 1) * ly.s + ly.k) if h and w else (0, 0)
            r = ar[pi[sel], None] * ly.s - ly.q + np.arange(hin)
            c = ar[pj[sel], None] * ly.s - ly.q + np.arange(win)
            valid = ((r >= 0) & (r < ly.s_in))[:, :, None] & ((c >= 0) & (c < ly.s_in))[:, None, :]
            rr, cc = r - pa[pi[sel], None], c - pa[pj[sel], None]
            inside = ((rr >= 0) & (rr < ph[pi[sel], None]))[:, :, None] & \
                     ((cc >= 0) & (cc < ph[pj[sel], None]))[:, None, :]
            clean_local = r[:, :, None] * ly.s_in + c[:, None, :]
            # the input layer's "recomputed window" is the patch: one baseline row per image
            tail_local = 0 if li == 1 else rr[:, :, None] * ph[pj[sel], None, None] + cc[:, None, :]
            b = np.arange(images)[:, None, None, None]
            tail = 1 + clean_rows + tail_base[sel, None, None] + tail_local + b * tail_bstride[sel, None, None]
            clean = 1 + b * ly.s_in ** 2 + clean_local
            pieces.append(np.where(valid, np.where(inside, tail, clean), 0).reshape(-1))
            groups.append(Group(h, w, hin, win, len(sel), cursor, out))
            boxes.append(torch.from_numpy(np.stack([ar[pi[sel]], ar[pj[sel]], windows[0][0][pi[sel]],
                                                    windows[0][0][pj[sel]]], 1).astype(np.int32)).to(device))
            cursor += images * len(sel) * hin * win
            new_base[sel] = out + np.arange(len(sel)) * h * w
            new_bstride[sel] = len(sel) * h * w
            out += images * len(sel) * h * w
            if ly.kind == "conv":
                flops += 2 * ly.c_in * ly.c_out * ly.k ** 2 * h * w * len(sel) * images
        index = torch.from_numpy(np.concatenate(pieces)).to(device)
        steps.append(Step(ly, tuple(groups), index, out, tuple(boxes)))
        tail_base, tail_bstride = new_base, new_bstride
    last, (pa, ph) = specs[-1], windows[-1]
    full = np.arange(last.s_out)
    rr, cc = full[None, :] - pa[pi, None], full[None, :] - pa[pj, None]
    inside = ((rr >= 0) & (rr < ph[pi, None]))[:, :, None] & ((cc >= 0) & (cc < ph[pj, None]))[:, None, :]
    b = np.arange(images)[:, None, None, None]
    clean_rows = images * last.s_out ** 2
    tail = 1 + clean_rows + tail_base[:, None, None] + b * tail_bstride[:, None, None] + \
        rr[:, :, None] * ph[pj, None, None] + cc[:, None, :]
    clean = 1 + b * last.s_out ** 2 + full[:, None] * last.s_out + full[None, :]
    head_index = torch.from_numpy(np.where(inside, tail, clean).reshape(-1)).to(device)
    return Plan(tuple(steps), head_index, images, npos, flops)


class TorchConv:
    """One conv layer (BN folded) + ReLU on torch's conv backend (oneDNN on CPU, cuDNN on CUDA); its windows on
    Winograd F(2x2, 3x3) where that is faster (:mod:`cifarbench.kernels.winograd`: wide 3x3 stride-1 convs on the
    CPU) unless ``winograd`` is False."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int, winograd: bool = True):
        self.weight = weight.contiguous(memory_format=torch.channels_last)
        self.bias, self.s, self.q, self.c_out = bias, stride, padding, weight.shape[0]
        self.winograd = Winograd3x3(weight, bias) if winograd and winograd_fits(weight, stride, 1, 1) else None

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """The whole map, with the layer's padding: ``[N, C, H, W]`` in and out (channels-last memory)."""
        return F.relu(F.conv2d(x, self.weight, self.bias, stride=self.s, padding=self.q))

    def window(self, x: torch.Tensor, out: torch.Tensor, scratch: dict | None = None) -> None:
        """Windows without padding (the gather already placed it): NHWC ``x`` ``[R, hin, win, C]`` into NHWC
        ``out`` ``[R, h, w, Cout]``; ``scratch``: the calling worker's buffers, which Winograd needs."""
        if self.winograd is not None and scratch is not None:
            self.winograd(x, out, scratch, relu=True)
            return
        y = F.conv2d(x.permute(0, 3, 1, 2), self.weight, self.bias, stride=self.s)
        torch.clamp_min(y, 0, out=out.permute(0, 3, 1, 2))


def max_pool_nhwc(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """2x2 max-pool, stride 2, of NHWC ``x`` for any dtype, as two elementwise maxima of strided views (torch's
    uint8 max-pool rejects channels-last maps this size, and ``amax`` over the window dims is slow for uint8);
    odd trailing rows and columns are dropped, as ``MaxPool2d(2)`` does."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    rows = torch.maximum(x[:, 0:h:2, :w], x[:, 1:h:2, :w])
    return torch.maximum(rows[:, :, 0::2], rows[:, :, 1::2], out=out)


def cpu_workers() -> int:
    """Position chunks in flight at once on the CPU: one per core the process may use."""
    return len(os.sched_getaffinity(0))


@contextmanager
def single_threaded_ops():
    """Each worker thread runs its chunk's ops on its own core: the window convolutions are small, and two of them
    side by side on one core each beat one at a time on both cores (intra-op threading scales ~1.5x on two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def nhwc_head(linears: list[tuple[torch.Tensor, torch.Tensor]], last: LayerSpec) -> list:
    """The head's ``(weight, bias)`` pairs with FC1's columns permuted from the NCHW flatten order to NHWC, once,
    so the engine's NHWC rows feed it without a transpose per batch."""
    (w1, b1), rest = linears[0], linears[1:]
    w1 = w1.view(-1, last.c_out, last.s_out, last.s_out).permute(0, 2, 3, 1).reshape(w1.shape[0], -1)
    return [(w1.contiguous(), b1)] + list(rest)


def normalization(model) -> tuple:
    """The ``(mean, std)`` a :class:`~cifarbench.nets.CifarNet` applies to [0, 1] pixels: read off the net where it
    says, else from :mod:`cifarbench.nets` (their one home; ``0.5`` is what every zoo net has used). The engine
    checks at construction that it reproduces the net's logits with them."""
    from .. import nets

    mean = getattr(model, "mean", None)
    std = getattr(model, "std", None)
    if mean is None or std is None or callable(mean) or callable(std):
        mean, std = getattr(nets, "MEAN", 0.5), getattr(nets, "STD", 0.5)
    return mean, std


def chain_fits(model) -> bool:
    """Whether :class:`IncrementalOcclusion` can run ``model``: a plain chain of conv blocks and 2x2 max pools with
    a linear head (the zoo nets). Others go to the graph engine (:mod:`cifarbench.kernels.incremental_graph`)."""
    try:
        layer_specs(model)
        model.conv_blocks()
        return any(isinstance(m, nn.Linear) for m in model.head)
    except (AttributeError, TypeError):
        return False


def _check_size(size) -> None:
    if tuple(np.broadcast_to(np.asarray(size), (2,))) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"the chain engine runs {IMAGE_SIZE}x{IMAGE_SIZE} inputs, not {size}")


class IncrementalOcclusion:
    """Exact occlusion maps for one :class:`~cifarbench.nets.CifarNet`, recomputing only changed windows.

    ``chunk`` bounds memory: each step takes ``chunk`` (image, position) pairs, ``chunk // images`` positions of
    every image; on the CPU ``workers`` steps (default: one per core) run side by side, each single-threaded.
    ``first_layer``: ``"auto"`` uses the fused Triton kernel (occlusion + conv1 + bias + ReLU) on CUDA when
    Triton is importable, ``"torch"`` always uses gather + conv.

    The layers are pluggable: each conv is an object with ``full(x)`` and ``window(x, out)`` (:class:`TorchConv`
    here; :mod:`cifarbench.kernels.incremental_int8` runs the same plan on ONNX Runtime's int8 convolutions, with
    uint8 rows in the buffers: every buffer takes the dtype of its layer's clean activation).
    """

    def __init__(self, model, device: str | torch.device | None = None, chunk: int = 160, buckets: int = 3,
                 first_layer: str = "auto", workers: int | None = None, winograd: bool = True):
        device = torch.device(device) if device is not None else next(model.parameters()).device
        specs = layer_specs(model)
        convs = [TorchConv(w.to(device), b.to(device), ly.s, ly.q, winograd)
                 for (w, b), ly in zip(map(folded_conv_params, model.conv_blocks().values()),
                                       [ly for ly in specs if ly.kind == "conv"])]
        linears = [(m.weight.detach().to(device), m.bias.detach().to(device))
                   for m in model.head if isinstance(m, nn.Linear)]
        mean, std = normalization(model)
        self._setup(specs, convs, nhwc_head(linears, specs[-1]), device, chunk, buckets, mean, std, workers=workers)
        self._verify(model)
        if first_layer == "auto" and self.device.type == "cuda" and self.specs[0].kind == "conv":
            from . import triton_occlusion

            self.use_triton = triton_occlusion.available()

    @torch.inference_mode()
    def _verify(self, model) -> None:
        """Refuse a net this engine would not reproduce (another normalization, a head it does not read): its clean
        logits on two random images must be the model's own."""
        x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)).to(self.device)
        ref = model.to(self.device)(x).float()
        h = self._clean(self._normalize(x))[-1].reshape(2, -1)
        for i, (w, b) in enumerate(self.head):
            h = F.linear(h, w, b)
            if i < len(self.head) - 1:
                h = F.relu(h)
        if ref.shape != h.shape or float((ref - h).abs().max()) > 1e-3 * (1 + float(ref.abs().max())):
            raise TypeError("the chain engine does not reproduce this net's logits")

    def _setup(self, specs, convs, head, device, chunk, buckets, mean: float = 0.5, std: float = 0.5,
               workers: int | None = None) -> None:
        self.specs, self.convs, self.head, self.device = specs, convs, head, torch.device(device)
        self.chunk, self.buckets = chunk, buckets
        self.workers = workers or cpu_workers()
        self._scratch: list[dict] = []  # per worker: buffers reused across chunks and calls (see _buffer)
        # per-channel (or one scalar) (x - mean) / std of [0, 1] pixels, as [1, C] for broadcasting
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).reshape(1, -1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).reshape(1, -1)
        self.use_triton = False

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """The net's input for [0, 1] pixels: images [B, C, H, W] or patch colours [B, C]."""
        if images.dim() == 4:
            return (images - self.mean[..., None, None]) / self.std[..., None, None]
        return (images - self.mean) / self.std

    def flops(self, k: int, stride: int = 1, size: int = IMAGE_SIZE) -> int:
        """Conv FLOPs per image of the incremental plan (all positions), for cost comparisons with dense.
        ``size``: the input side, which for this engine's nets is always 32 (as in
        :class:`~cifarbench.kernels.incremental_graph.GraphOcclusion`'s signature)."""
        _check_size(size)
        n = ((IMAGE_SIZE - k) // stride + 1) ** 2
        return build_plan(self.specs, k, stride, 0, n, 1, self.buckets).flops

    def dense_flops(self, size: int = IMAGE_SIZE) -> int:
        _check_size(size)
        """Conv FLOPs of one whole-image forward pass, the dense engine's cost per position."""
        return sum(2 * ly.c_in * ly.c_out * ly.k ** 2 * ly.s_out ** 2 for ly in self.specs if ly.kind == "conv")

    def _clean(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NHWC rows of every layer's clean activation, the input (normalized) first."""
        acts = [x.permute(0, 2, 3, 1).reshape(-1, 3)]
        convs = iter(self.convs)
        x = x.contiguous(memory_format=torch.channels_last)
        for ly in self.specs:
            if ly.kind == "conv":
                x = next(convs).full(x)
            else:
                x = max_pool_nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            acts.append(x.permute(0, 2, 3, 1).reshape(-1, ly.c_out))
        return acts

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, baselines: torch.Tensor, k: int, stride: int = 1) -> torch.Tensor:
        """Logits ``[B, P, 10]`` for every patch position (row-major) of each of ``images`` ``[B, 3, 32, 32]`` in
        [0, 1], with per-image patch colours ``baselines`` ``[B, 3]`` in [0, 1]."""
        images = images.to(self.device, torch.float32)
        baselines = baselines.to(self.device, torch.float32)
        n_img = len(images)
        x = self._normalize(images)
        base = self._normalize(baselines)
        clean = self._clean(x)
        n = (IMAGE_SIZE - k) // stride + 1
        total = n * n
        per = max(1, self.chunk // n_img)  # windows per step bounded whatever the batch: memory stays flat
        out = torch.empty(n_img, total, self.head[-1][0].shape[0], device=self.device)

        @torch.inference_mode()  # thread-local: the workers need it too
        def run(worker: int) -> None:
            for p0 in starts[worker::workers]:
                p1 = min(total, p0 + per)
                plan = build_plan(self.specs, k, stride, p0, p1, n_img, self.buckets, str(self.device))
                rows = self._run_plan(plan, clean, base, x, k, self._scratch[worker])
                out[:, p0:p1] = rows.view(n_img, p1 - p0, -1)

        starts = range(0, total, per)
        workers = min(self.workers, len(starts)) if self.device.type == "cpu" else 1
        while len(self._scratch) < workers:
            self._scratch.append({})
        if workers > 1:
            with single_threaded_ops(), ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, range(workers)))
        else:
            run(0)
        return out

    def _buffer(self, scratch: dict, key, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A ``[rows, cols]`` buffer kept between chunks and calls on the CPU (:func:`.scratch.scratch_buffer`);
        CUDA's caching allocator already reuses memory."""
        if self.device.type != "cpu":
            return torch.empty(rows, cols, dtype=dtype, device=self.device)
        return scratch_buffer(scratch, key, (rows, cols), dtype, self.device)[0]

    def _run_plan(self, plan: Plan, clean, base, x, k, scratch: dict) -> torch.Tensor:
        zero = torch.zeros(1, 3, device=self.device)
        prev = torch.cat([zero, clean[0], base])
        convs = iter(self.convs)
        for li, step in enumerate(plan.steps):
            ly = step.layer
            head_rows = 1 + len(clean[li + 1])
            buf = self._buffer(scratch, ("layer", li), head_rows + step.tail_rows, ly.c_out, clean[li + 1].dtype)
            buf[0].zero_()
            buf[1:head_rows].copy_(clean[li + 1])
            conv = next(convs) if ly.kind == "conv" else None
            if li == 0 and self.use_triton:
                from .triton_occlusion import first_layer_windows

                tail = buf[head_rows:]
                for g, boxes in zip(step.groups, step.windows):
                    if not (g.h and g.w):
                        continue
                    rows = plan.images * g.n * g.h * g.w
                    first_layer_windows(x, base, conv.weight, conv.bias, boxes, g.h, g.w, k, ly.s, ly.q,
                                        tail[g.out:g.out + rows])
                prev = buf
                continue
            gathered = torch.index_select(prev, 0, step.index, out=self._buffer(
                scratch, ("gather", li), len(step.index), ly.c_in, prev.dtype))
            for g in step.groups:
                if not (g.h and g.w):
                    continue  # positions whose patch this layer never reads
                rows = plan.images * g.n
                xg = gathered[g.start:g.start + rows * g.hin * g.win].view(rows, g.hin, g.win, ly.c_in)
                dst = buf[head_rows + g.out:head_rows + g.out + rows * g.h * g.w].view(rows, g.h, g.w, ly.c_out)
                if conv is not None:
                    conv.window(xg, dst, scratch)
                else:
                    max_pool_nhwc(xg, out=dst)
            prev = buf
        last = self.specs[-1]
        h = prev.index_select(0, plan.head_index).view(-1, last.s_out ** 2 * last.c_out)
        h = h.float()  # uint8 rows (int8 engine): their scale is folded into FC1's weights
        for i, (w, b) in enumerate(self.head):
            h = F.linear(h, w, b)
            if i < len(self.head) - 1:
                h = F.relu(h)
        return h
