"""Exact incremental occlusion over the layer-graph IR of :mod:`cifarbench.kernels.graph`: any CNN, any square
(or rectangular) input, no net class.

The plan is :mod:`cifarbench.kernels.incremental`'s, generalised from a chain to a DAG:

* **Changed rectangles.** A K x K patch at (y, x) changes a rectangle of the input. Per axis (the two axes are
  independent), a node with kernel ``k``, stride ``s``, left padding ``p`` and dilation ``d`` changes outputs
  ``o`` with ``o*s - p + j*d`` in the changed input range for some ``j``: ``[ceil((lo + p - (k-1)d) / s),
  floor((hi - 1 + p) / s) + 1)``, clipped to its map; pointwise nodes keep the range; residual adds, products and
  concatenations take the union (bounding range) of their inputs' ranges.
* **Windows.** Each node recomputes a window covering its changed range; per axis the window sizes over all
  positions are rounded up to at most ``buckets`` values and shifted to stay inside the map, so each node runs
  as a few large batched ops (one per size pair) over many patch positions and images at once.
* **Buffers and gathers.** Every node keeps rows ``[0 | -inf | clean activation (NHWC) | recomputed windows]``.
  A window's input is one ``index_select`` per input edge with an index computed once per geometry, K, stride and
  position range: recomputed rows where the producer was recomputed, clean rows elsewhere, and the 0 row
  (convolution, average pooling) or the -inf row (max pooling) for padding. Ops then run with padding 0.
  Average pooling that excludes padding, or uses ``ceil_mode``, is a window sum times the dense op's own
  per-position reciprocal divisor.
* **Fused pointwise ops.** BN is folded into its conv; activations after a conv / pool / add are applied before
  the window is written (``ReLU`` straight into the buffer).
* **Dense where covered.** Where a node's changed rectangle covers its whole map, its window is the whole map
  read with the layer's own padding: the same code is plain dense evaluation of the rest of the net for that
  batch of positions; the tail after the spatial part (global pooling, flatten, linear...) always runs dense on
  the full maps of the frontier nodes.
* On the CPU, position chunks run on one worker thread per core, each single-threaded, each keeping its buffers.

Exact: every recomputed value reads exactly the inputs a dense pass reads, so maps equal the naive loop's up to
float summation order. The clean logits of the IR are checked against the module's own on every call.
"""
from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .graph import Graph, UnsupportedOp, build_graph, relu  # noqa: F401  (UnsupportedOp: part of this API)
from .incremental import cpu_workers, single_threaded_ops
from .scratch import scratch_buffer
from .winograd import Winograd3x3
from .winograd import fits as winograd_fits

#: rows before a buffer's clean activation: the zero row (padding of convs and average pools) and the -inf row
#: (padding of max pools)
HEAD = 2
#: plans kept (one per position chunk, K, stride, input size and image count)
PLAN_CACHE = 128
#: elements (floats, and int64 index entries) a worker's window buffers and gathers may hold for one step, on
#: average over positions; bounds memory at large inputs (net4 at K=8: ~330,000 per pair, so 160 pairs fit on
#: the CPU; CUDA steps are larger, as in kernels/incremental.py's 16,384-pair GPU steps)
STEP_ELEMENTS = {"cpu": 1 << 26, "cuda": 1 << 30}


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


def changed_ranges(graph: Graph, axis: int, k: int, stride: int):
    """Per node, per patch position along ``axis``: the changed output range ``[lo, hi)`` (empty: ``lo == hi``)."""
    starts = np.arange((graph.size[axis] - k) // stride + 1) * stride
    ranges = []
    for node in graph.nodes:
        if node.kind == "input":
            ranges.append((starts, starts + k))
            continue
        out = node.shape[1 + axis]
        if node.kind in ("conv", "maxpool", "avgpool"):
            a = node.axes[axis]
            lo, hi = ranges[node.inputs[0]]
            lo_o = np.clip(-((-(lo + a.p - a.span + 1)) // a.s), 0, out)
            hi_o = np.clip((hi - 1 + a.p) // a.s + 1, 0, out)
            empty = (hi <= lo) | (hi_o <= lo_o)
        else:  # pointwise, binary, concat: the union of the inputs' ranges
            los = np.stack([ranges[u][0] for u in node.inputs])
            his = np.stack([ranges[u][1] for u in node.inputs])
            some = his > los
            lo_o = np.where(some, los, np.iinfo(np.int64).max).min(0)
            hi_o = np.where(some, his, -1).max(0)
            empty = ~some.any(0)
        lo_o = np.where(empty, 0, lo_o)
        ranges.append((lo_o, np.where(empty, 0, hi_o)))
    return ranges


def axis_windows(graph: Graph, axis: int, k: int, stride: int, buckets: int):
    """Per node, per position along ``axis``: the recomputed window's start and size (the input's is the patch)."""
    windows = []
    for node, (lo, hi) in zip(graph.nodes, changed_ranges(graph, axis, k, stride)):
        if node.kind == "input":
            windows.append((lo, hi - lo))
            continue
        size = _round_up(hi - lo, buckets)
        windows.append((np.minimum(lo, node.shape[1 + axis] - size), size))
    return windows


@dataclass(frozen=True)
class Group:
    """Windows of output size ``h x w`` of one node: ``n`` positions per image; per input edge its gather index;
    output rows ``[out, out + images*n*h*w)`` of the node's recomputed part; ``scale``: the average pool's
    reciprocal divisors on these windows, ``[images*n, 1, h, w]`` (or None)."""

    h: int
    w: int
    n: int
    ins: tuple[tuple[int, int], ...]  # (hin, win) per input edge
    index: tuple[torch.Tensor, ...]
    out: int
    scale: torch.Tensor | None


@dataclass(frozen=True)
class Plan:
    steps: tuple[tuple[Group, ...], ...]  # per node (node 0, the input, has none)
    tail_rows: tuple[int, ...]
    head_index: tuple[torch.Tensor, ...]  # per frontier node
    images: int
    positions: int
    flops: int


def build_plan(graph: Graph, k: int, stride: int, p0: int, p1: int, images: int, buckets: int = 3,
               device: str = "cpu", scales: dict | None = None, positions: np.ndarray | None = None,
               owners: np.ndarray | None = None, clean_images: int | None = None) -> Plan:
    """Gather indices and window groups for positions ``[p0, p1)`` (row-major over the map) of ``images`` images,
    or for ``positions[p0:p1]`` when a list of row-major positions is given (the approximate mode's drill-down).
    ``owners`` (with ``positions``, ``images=1``): position ``positions[i]`` is occluded in image ``owners[i]``
    of the ``clean_images`` whose clean rows the buffers hold, so one plan serves (image, position) pairs that
    differ per image. ``scales``: per average-pool node needing it, its dense ``[H, W]`` map of reciprocal
    divisors."""
    wr, wc = axis_windows(graph, 0, k, stride, buckets), axis_windows(graph, 1, k, stride, buckets)
    ncol = len(wc[0][0])
    pos = np.arange(p0, p1) if positions is None else np.asarray(positions[p0:p1], np.int64)
    pi, pj = pos // ncol, pos % ncol
    npos = len(pos)
    clean_images = images if clean_images is None else clean_images
    if owners is not None and (images != 1 or positions is None):
        raise ValueError("owners need a positions list and images=1")
    # the clean image each position reads (0 without owners: then ``b`` walks the images)
    own = np.zeros(npos, np.int64) if owners is None else np.asarray(owners[p0:p1], np.int64)
    b = np.arange(images)[:, None, None, None]
    # where position p's window of node v starts in v's recomputed part, and the step from one image to the next;
    # node 0's "recomputed part" is one baseline row per clean image
    base = {0: own}
    bstride = {0: np.ones(npos, np.int64)}
    steps, tail_rows, flops = [()], [clean_images], 0

    def index_into(u: int, sel, r: np.ndarray, c: np.ndarray, pad: int) -> np.ndarray:
        """Rows of node ``u``'s buffer for input rows ``r`` [n, hin] and columns ``c`` [n, win] of positions
        ``sel``, for every image: ``[images, n, hin, win]``."""
        _, hu, wu = graph.nodes[u].shape
        (sr, zr), (sc, zc) = wr[u], wc[u]
        valid = ((r >= 0) & (r < hu))[:, :, None] & ((c >= 0) & (c < wu))[:, None, :]
        rr, cc = r - sr[pi[sel], None], c - sc[pj[sel], None]
        inside = ((rr >= 0) & (rr < zr[pi[sel], None]))[:, :, None] & \
                 ((cc >= 0) & (cc < zc[pj[sel], None]))[:, None, :]
        # the input's "recomputed window" is the patch: one baseline row per image
        local = 0 if u == 0 else rr[:, :, None] * zc[pj[sel], None, None] + cc[:, None, :]
        tail = HEAD + clean_images * hu * wu + base[u][sel, None, None] + b * bstride[u][sel, None, None] + local
        clean = HEAD + (b + own[sel, None, None]) * hu * wu + r[:, :, None] * wu + c[:, None, :]
        return np.where(valid, np.where(inside, tail, clean), pad)

    for v in range(1, len(graph.nodes)):
        node = graph.nodes[v]
        (ar, hr), (ac, hc) = wr[v], wc[v]
        sizes = np.stack([hr[pi], hc[pj]], 1)
        groups, out = [], 0
        base[v], bstride[v] = np.zeros(npos, np.int64), np.zeros(npos, np.int64)
        geometric = node.kind in ("conv", "maxpool", "avgpool")
        ah, aw = node.axes
        pad = 1 if node.kind == "maxpool" else 0
        for h, w in sorted({tuple(x) for x in sizes.tolist()}):
            sel = np.flatnonzero((sizes[:, 0] == h) & (sizes[:, 1] == w))
            if not (h and w):
                continue  # positions whose patch this node never reads: consumers read its clean rows
            ins, index = [], []
            for u in node.inputs:
                if geometric:
                    hin, win = (h - 1) * ah.s + ah.span, (w - 1) * aw.s + aw.span
                    r = ar[pi[sel], None] * ah.s - ah.p + np.arange(hin)
                    c = ac[pj[sel], None] * aw.s - aw.p + np.arange(win)
                else:
                    hin, win = h, w
                    r = ar[pi[sel], None] + np.arange(h)
                    c = ac[pj[sel], None] + np.arange(w)
                ins.append((hin, win))
                index.append(torch.from_numpy(index_into(u, sel, r, c, pad).reshape(-1)).to(device))
            scale = None
            if scales is not None and v in scales:
                r = ar[pi[sel], None] + np.arange(h)
                c = ac[pj[sel], None] + np.arange(w)
                s = scales[v][r[:, :, None], c[:, None, :]]  # [n, h, w]
                scale = torch.from_numpy(np.broadcast_to(s[None], (images,) + s.shape).reshape(-1, 1, h, w)
                                         .astype(np.float32)).to(device)
            groups.append(Group(h, w, len(sel), tuple(ins), tuple(index), out, scale))
            base[v][sel] = out + np.arange(len(sel)) * h * w
            bstride[v][sel] = len(sel) * h * w
            out += images * len(sel) * h * w
            if node.kind == "conv":
                c_in = graph.nodes[node.inputs[0]].shape[0]
                flops += 2 * c_in // node.groups * node.shape[0] * ah.k * aw.k * h * w * len(sel) * images
        steps.append(tuple(groups))
        tail_rows.append(out)
    heads = []
    for f in graph.frontier:
        _, hf, wf = graph.nodes[f].shape
        r = np.broadcast_to(np.arange(hf), (npos, hf))
        c = np.broadcast_to(np.arange(wf), (npos, wf))
        heads.append(torch.from_numpy(index_into(f, np.arange(npos), r, c, 0).reshape(-1)).to(device))
    return Plan(tuple(steps), tuple(tail_rows), tuple(heads), images, npos, flops)


def plan_flops(graph: Graph, k: int, stride: int = 1, buckets: int = 3) -> int:
    """Conv FLOPs per image of the incremental plan over all positions (no engine, nothing moved or copied:
    ``plan_flops(build_graph(module, size), k, stride)``)."""
    n = ((graph.size[0] - k) // stride + 1) * ((graph.size[1] - k) // stride + 1)
    return build_plan(graph, k, stride, 0, n, 1, buckets).flops


def dense_flops(graph: Graph) -> int:
    """Conv FLOPs of one whole-image forward pass of the graph's spatial part."""
    total = 0
    for node in graph.nodes:
        if node.kind == "conv":
            c_in = graph.nodes[node.inputs[0]].shape[0]
            total += 2 * c_in // node.groups * node.shape[0] * node.axes[0].k * node.axes[1].k * \
                node.shape[1] * node.shape[2]
    return total


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


class GraphOcclusion:
    """Exact occlusion for any module the IR of :mod:`cifarbench.kernels.graph` represents.

    ``GraphOcclusion(module, device=None, chunk=160, buckets=3, workers=None, size=32)`` builds the IR for
    ``size`` x ``size`` inputs (raises :class:`~cifarbench.kernels.graph.UnsupportedOp` naming an op it cannot
    run); other input sizes are built on first use. ``chunk``: (image, position) pairs per step (memory bound,
    further capped by ``step_elements``, default :data:`STEP_ELEMENTS`); on the CPU ``workers`` steps (default
    one per core) run side by side. ``window_dtype``: the dtype of recomputed windows and the buffers they read
    (default float32, exact); ``torch.bfloat16`` runs the window convs on AMX / bf16 units where the CPU has them
    (5-9x faster convs on an AMX Xeon), no longer exact: :mod:`cifarbench.kernels.approx` uses it and measures the
    error; clean activations, the tail and the softmax stay float32. Same ``logits`` / ``flops`` /
    ``dense_flops`` interface as :class:`~cifarbench.kernels.incremental.IncrementalOcclusion` (``use_triton`` is
    always False here).
    """

    use_triton = False

    def __init__(self, module, device=None, chunk: int = 160, buckets: int = 3, workers: int | None = None,
                 size: int | tuple[int, int] = 32, step_elements: int | None = None,
                 window_dtype: torch.dtype = torch.float32, winograd: bool = True):
        from .graph import trace

        if window_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"window_dtype must be float32, bfloat16 or float16, not {window_dtype}")
        self.window_dtype = window_dtype
        self._wnodes: dict[tuple[int, int], list] = {}
        tensors = list(itertools.chain(module.parameters(), module.buffers()))
        here = tensors[0].device if tensors else torch.device("cpu")
        self.device = torch.device(device) if device is not None else here
        # eval semantics are what the IR computes (BN running statistics, dropout off): the module is set to eval,
        # as the occlusion engines always did; a module on another device is copied there, never moved
        module.eval()
        self.module = module if _same_device(here, self.device) else copy.deepcopy(module).to(self.device)
        self.traced = trace(self.module)
        self.chunk, self.buckets = chunk, buckets
        self.step_elements = step_elements or STEP_ELEMENTS.get(self.device.type, STEP_ELEMENTS["cuda"])
        self.workers = workers or cpu_workers()
        self._graphs: dict[tuple[int, int], Graph] = {}
        self._scales: dict[tuple[int, int], dict] = {}
        # per input size, the conv nodes whose fp32 windows run on Winograd F(2x2, 3x3) (kernels.winograd)
        self.winograd = winograd
        self._winograd: dict[tuple[int, int], dict[int, Winograd3x3]] = {}
        self._plans: OrderedDict = OrderedDict()
        self._scratch: list[dict] = []
        self.graph(size)
        self._verify(size)

    @torch.inference_mode()
    def _verify(self, size) -> None:
        """Refuse at construction a traced graph that does not compute what the module computes (Python control
        flow that tracing froze, a module whose ``forward`` reads state): compare on two random images."""
        g = self.graph(size)
        x = torch.rand(2, g.nodes[0].shape[0], *g.size, generator=torch.Generator().manual_seed(0))
        x = x.to(self.device)
        ref = self.module(x.clone())  # a copy: a model that writes into its input (x.sub_(m)) leaves x as it was
        if not isinstance(ref, torch.Tensor) or ref.dim() != 2:
            raise UnsupportedOp("model output", "-", "is not one [N, classes] tensor of logits")
        got = g.run(x.contiguous(memory_format=torch.channels_last))[1]
        if ref.shape != got.shape or float((ref - got).abs().max()) > 1e-3 * (1 + float(ref.abs().max())):
            raise UnsupportedOp("traced graph", "-", "does not reproduce the model's output (data-dependent "
                                "control flow or state in forward?)")

    # ------------------------------------------------------------------ IR per input size

    def graph(self, size) -> Graph:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if size not in self._graphs:
            g = build_graph(self.traced, size)
            for node in g.nodes:  # channels-last weights, as the NHWC windows: oneDNN then reorders nothing per call
                if node.kind == "conv":
                    node.weight = node.weight.contiguous(memory_format=torch.channels_last)
            self._graphs[size] = g
            self._scales[size] = self._avgpool_scales(g)
            # nodes the windows run: the same, or shallow copies with weights in the window dtype
            wnodes = []
            for node in g.nodes:
                if self.window_dtype != torch.float32 and node.weight is not None:
                    node = copy.copy(node)
                    node.weight = node.weight.to(self.window_dtype)
                    node.bias = None if node.bias is None else node.bias.to(self.window_dtype)
                wnodes.append(node)
            self._wnodes[size] = wnodes
            self._winograd[size] = {
                v: Winograd3x3(node.weight, node.bias) for v, node in enumerate(wnodes)
                if self.winograd and node.kind == "conv" and node.weight.dtype == torch.float32 and winograd_fits(
                    node.weight, (node.axes[0].s, node.axes[1].s), (node.axes[0].d, node.axes[1].d), node.groups)}
        return self._graphs[size]

    def _avgpool_scales(self, g: Graph) -> dict:
        """Per average pool whose divisor is not always k*k (padding excluded, ceil_mode, a divisor override):
        the dense op's reciprocal divisor per output position, from the op itself on a map of ones."""
        scales = {}
        for v, node in enumerate(g.nodes):
            if node.kind != "avgpool":
                continue
            pool = node.pool
            if pool.get("count_include_pad", True) and not pool.get("ceil_mode") and \
                    pool.get("divisor_override") is None:
                continue
            _, hi, wi = g.nodes[node.inputs[0]].shape
            ones = torch.ones(1, 1, hi, wi, dtype=torch.float64)
            (ah, aw) = node.axes
            mean = F.avg_pool2d(ones, (ah.k, aw.k), (ah.s, aw.s), (ah.p, aw.p), **pool)[0, 0]
            summed = F.avg_pool2d(ones, (ah.k, aw.k), (ah.s, aw.s), (ah.p, aw.p), ceil_mode=pool.get("ceil_mode",
                                  False), count_include_pad=True, divisor_override=1)[0, 0]
            # windows read only padding have sum 0 and mean 0 in torch; any factor gives 0 there
            scales[v] = torch.where(summed > 0, mean / summed.clamp_min(1), torch.zeros_like(mean)).numpy()
        return scales

    def summary(self, size=32) -> list[str]:
        """One ``name:kind+fused ops`` string per node of the IR for ``size`` inputs."""
        return self.graph(size).describe()

    # ------------------------------------------------------------------ costs

    def flops(self, k: int, stride: int = 1, size: int = 32) -> int:
        """Conv FLOPs per image of the incremental plan (all positions)."""
        return plan_flops(self.graph(size), k, stride, self.buckets)

    def dense_flops(self, size: int = 32) -> int:
        """Conv FLOPs of one whole-image forward pass (the spatial part)."""
        return dense_flops(self.graph(size))

    def step_positions(self, k: int, stride: int, size: int | tuple[int, int]) -> int:
        """Positions of one image per step (one chunk of work) at this K and stride: the full map runs in steps of
        this many, ``workers`` of them at a time on the CPU. A timing that stands for a whole map must take that
        path, i.e. cover at least ``workers`` steps (see ``analysis.occlusion.measure_auto``)."""
        g = self.graph(size)
        return max(1, min(self.chunk, self.step_elements // self._step_cost(g, k, stride)))

    def _step_cost(self, g: Graph, k: int, stride: int) -> int:
        """Elements one (image, position) pair needs in buffers and gathers, on average over positions."""
        wr, wc = axis_windows(g, 0, k, stride, self.buckets), axis_windows(g, 1, k, stride, self.buckets)
        cost = 0
        for v, node in enumerate(g.nodes[1:], start=1):
            h, w = float(wr[v][1].mean()), float(wc[v][1].mean())
            cost += h * w * node.shape[0]
            for u in node.inputs:
                if node.kind in ("conv", "maxpool", "avgpool"):
                    hin, win = (h - 1) * node.axes[0].s + node.axes[0].span, (w - 1) * node.axes[1].s + \
                        node.axes[1].span
                else:
                    hin, win = h, w
                cost += hin * win * (g.nodes[u].shape[0] + 2)  # the gather and its int64 index
        for f in g.frontier:
            cost += int(np.prod(g.nodes[f].shape)) * 3
        return max(int(cost), 1)

    # ------------------------------------------------------------------ running

    def _plan(self, g: Graph, k, stride, p0, p1, images, positions: np.ndarray | None = None,
              owners: np.ndarray | None = None, clean_images: int | None = None) -> Plan:
        # position and owner lists are part of the key by value (their bytes): two lists never share a plan
        key = (g.size, k, stride, p0, p1, images, None if positions is None else positions.tobytes(),
               None if owners is None else owners.tobytes(), clean_images)
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(g, k, stride, p0, p1, images, self.buckets, str(self.device), self._scales[g.size],
                              positions, owners, clean_images)
            self._plans[key] = plan
            while len(self._plans) > PLAN_CACHE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    @torch.inference_mode()
    def clean(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every node's clean activation as NHWC rows, and the IR's clean logits, checked against the module's."""
        g = self.graph(tuple(images.shape[2:]))
        x = images.contiguous(memory_format=torch.channels_last)
        acts, logits = g.run(x)
        ref = self.module(images.clone())  # a model that writes into its input must not change the images
        tol = 1e-3 * (1 + float(ref.abs().max()))
        if ref.shape != logits.shape or float((ref - logits).abs().max()) > tol:
            raise RuntimeError("the layer-graph IR does not reproduce the model's clean output; "
                               "refusing to compute maps from it")
        rows = [a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]) for a in acts]
        return rows, logits

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, baselines: torch.Tensor, k: int, stride: int = 1,
               positions=None, owners=None) -> torch.Tensor:
        """Logits ``[B, P, classes]`` for every patch position (row-major) of each of ``images`` ``[B, C, H, W]``
        in [0, 1], with per-image patch values ``baselines`` ``[B, C]``. ``P = ((H-K)//stride+1) *
        ((W-K)//stride+1)``. ``positions``: only these row-major positions (any order, the same for every
        image; ``P = len(positions)``), as :mod:`cifarbench.kernels.approx`'s drill-down asks. ``owners`` (one
        image index per entry of ``positions``): (image, position) pairs instead, each image with its own
        positions, all in one call; the result is then ``[1, P, classes]``."""
        images = images.to(self.device, torch.float32)
        baselines = baselines.to(self.device, torch.float32)
        g = self.graph(tuple(images.shape[2:]))
        if not (1 <= k <= min(g.size)) or stride < 1:
            raise ValueError(f"K={k}, stride={stride} do not fit a {g.size[0]}x{g.size[1]} input")
        n_img = len(images)
        clean, clean_logits = self.clean(images)
        if self.window_dtype != torch.float32:
            clean = [c.to(self.window_dtype) for c in clean]
        base = baselines.view(n_img, -1, 1, 1)
        for f in g.nodes[0].post:
            base = f(base)
        base = base.reshape(n_img, -1).to(self.window_dtype)
        total = ((g.size[0] - k) // stride + 1) * ((g.size[1] - k) // stride + 1)
        if positions is not None:
            positions = np.asarray(positions, dtype=np.int64).reshape(-1)
            if len(positions) and (positions.min() < 0 or positions.max() >= total):
                raise ValueError(f"positions must lie in [0, {total}) for K={k}, stride={stride}")
            total = len(positions)
        reps, clean_images = n_img, None
        if owners is not None:
            owners = np.asarray(owners, dtype=np.int64).reshape(-1)
            if positions is None or len(owners) != total:
                raise ValueError("owners need a positions list of the same length")
            if total and (owners.min() < 0 or owners.max() >= n_img):
                raise ValueError(f"owners must lie in [0, {n_img})")
            reps, clean_images = 1, n_img
        if positions is not None and total == 0:
            return torch.empty(reps, 0, clean_logits.shape[-1], device=self.device)
        per = max(1, self.step_positions(k, stride, g.size) // reps)
        out = torch.empty(reps, total, clean_logits.shape[-1], device=self.device)
        token = object()  # a new call: buffers' clean rows must be copied again

        @torch.inference_mode()  # thread-local: the workers need it too
        def run(worker: int) -> None:
            for p0 in starts[worker::workers]:
                p1 = min(total, p0 + per)
                plan = self._plan(g, k, stride, p0, p1, reps, positions, owners, clean_images)
                rows = self._run_plan(g, plan, clean, base, self._scratch[worker], token)
                out[:, p0:p1] = rows.view(reps, p1 - p0, -1)

        workers = self.workers if self.device.type == "cpu" else 1
        if workers > 1:  # as many chunks on every worker, each no larger than the memory bound
            chunks = -(-total // per)
            chunks = -(-chunks // workers) * workers
            per = -(-total // chunks)
        starts = range(0, total, per)
        workers = min(workers, len(starts))
        while len(self._scratch) < workers:
            self._scratch.append({})
        if workers > 1 and len(starts) <= PLAN_CACHE:
            # plans are built on the calling thread first: numpy index building holds the GIL anyway
            for p0 in starts:
                self._plan(g, k, stride, p0, min(total, p0 + per), reps, positions, owners, clean_images)
            with single_threaded_ops(), ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, range(workers)))
        else:
            # one thread walks every chunk (run() strides the chunks by ``workers``: with more chunks than the plan
            # cache holds, two workers' worth of strides on one thread left every other chunk uncomputed)
            workers = 1
            run(0)
        return out

    def probability_maps(self, images: torch.Tensor, baselines: torch.Tensor, k: int, stride: int = 1,
                         targets: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax probability of each image's target class (default: its clean prediction) per patch position,
        ``[B, H', W']`` with ``H' = (H - K) // stride + 1``."""
        images = images.to(self.device, torch.float32)
        logits = self.logits(images, baselines, k, stride)
        if targets is None:
            with torch.inference_mode():
                targets = self.module(images.clone()).argmax(1)
        probs = torch.softmax(logits.float(), -1)
        t = torch.as_tensor(targets, device=probs.device).view(-1, 1, 1).expand(-1, probs.shape[1], 1)
        h = (images.shape[2] - k) // stride + 1
        return probs.gather(2, t)[..., 0].view(len(images), h, -1)

    def _buffer(self, scratch: dict, key, rows: int, cols: int, dtype) -> tuple[torch.Tensor, bool]:
        """A ``[rows, cols]`` buffer kept between chunks and calls (:func:`.scratch.scratch_buffer`), and whether
        it is new (its head rows must be written again)."""
        return scratch_buffer(scratch, key, (rows, cols), dtype, self.device)

    def _run_plan(self, g: Graph, plan: Plan, clean, base, scratch: dict, token) -> torch.Tensor:
        new_call = scratch.get("token") is not token
        scratch["token"] = token
        wnodes, winograd = self._wnodes[g.size], self._winograd[g.size]
        bufs = []
        for v, node in enumerate(g.nodes):
            c = node.shape[0] if v else clean[0].shape[1]
            head_rows = HEAD + len(clean[v])
            buf, fresh = self._buffer(scratch, ("node", v), head_rows + plan.tail_rows[v], c, clean[v].dtype)
            if fresh or new_call:
                buf[0].zero_()
                buf[1].fill_(float("-inf"))
                buf[HEAD:head_rows].copy_(clean[v])
            bufs.append(buf)
            if v == 0:
                buf[head_rows:].copy_(base)
                continue
            for gi, grp in enumerate(plan.steps[v]):
                rows = plan.images * grp.n
                xs = []
                for e, (u, (hin, win), index) in enumerate(zip(node.inputs, grp.ins, grp.index)):
                    cu = bufs[u].shape[1]
                    gathered, _ = self._buffer(scratch, ("gather", v, e), len(index), cu, bufs[u].dtype)
                    torch.index_select(bufs[u], 0, index, out=gathered)
                    xs.append(gathered.view(rows, hin, win, cu).permute(0, 3, 1, 2))
                dst = buf[head_rows + grp.out:head_rows + grp.out + rows * grp.h * grp.w] \
                    .view(rows, grp.h, grp.w, c).permute(0, 3, 1, 2)
                if v in winograd:
                    _winograd_window(winograd[v], wnodes[v].post, xs[0], dst, scratch)
                else:
                    self._window(wnodes[v], xs, grp, dst)
        outs = []
        for f, index in zip(g.frontier, plan.head_index):
            cf, hf, wf = g.nodes[f].shape
            outs.append(bufs[f].index_select(0, index).view(-1, hf, wf, cf).permute(0, 3, 1, 2).float())
        return g.tail(*outs)

    @staticmethod
    def _window(node, xs, grp: Group, dst: torch.Tensor) -> None:
        """The node's op on padded input windows ``xs`` (NCHW views), fused ops applied, written into ``dst``."""
        from .graph import apply_op

        if node.kind == "concat" and not node.post:
            c0 = 0
            for x in xs:
                dst[:, c0:c0 + x.shape[1]].copy_(x)
                c0 += x.shape[1]
            return
        if node.kind == "avgpool" and grp.scale is not None:
            (ah, aw) = node.axes
            y = F.avg_pool2d(xs[0], (ah.k, aw.k), (ah.s, aw.s), 0, divisor_override=1) * grp.scale
        else:
            y = apply_op(node, xs, whole=False)
        post = node.post
        if post and post[-1] is relu:
            for f in post[:-1]:
                y = f(y)
            torch.clamp_min(y, 0, out=dst)
            return
        for f in post:
            y = f(y)
        dst.copy_(y)


def _winograd_window(conv: Winograd3x3, post: list, x: torch.Tensor, dst: torch.Tensor, scratch: dict) -> None:
    """A conv node's windows on Winograd: NCHW views ``x`` and ``dst`` of NHWC rows, its fused ops after it (a
    lone ReLU fused into the output pass)."""
    fused = len(post) == 1 and post[0] is relu
    conv(x.permute(0, 2, 3, 1), dst.permute(0, 2, 3, 1), scratch, relu=fused)
    if post and not fused:
        y = dst
        for f in post:
            y = f(y)
        dst.copy_(y)
