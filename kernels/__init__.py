"""Occlusion engines (installed as ``cifarbench.kernels``): exact incremental occlusion over a layer-graph IR, its
approximate mode, and the older special-purpose engines. Each module's docstring has the details; this is the map.

**The IR** (:mod:`.graph`). ``build_graph(module, size)`` traces any torch module with ``torch.fx`` into spatial
nodes in topological order -- ``input``, ``conv`` (any kernel / stride / padding / dilation / groups, BN folded),
``maxpool`` / ``avgpool``, ``binary`` (residual add, product), ``concat``, ``pointwise`` (activations,
normalization) -- each with per-axis geometry ``Axis(k, s, p, d)`` and fused ``post`` activations, plus a *dense
tail* (``fx.GraphModule``: global pooling, flatten, linear, ...) that starts at the first op mixing all positions.
An op it cannot represent raises ``UnsupportedOp`` naming it (callers then go dense, or refuse in one line). The
engine knows node kinds and geometry only, never a net class. An fp32 ONNX graph reaches the IR through
:mod:`.onnx_module`, which translates it to an fx-traceable torch module (weights as buffers); an int8 graph goes
to :mod:`.incremental_int8` instead.

**The plan** (:mod:`.incremental_graph`). For every patch position, each node's changed rectangle follows from
its inputs' (per axis: kernel widens it, stride shrinks it; adds and concats take the union), rounded up to a
few window sizes so a node runs as a handful of large batched ops over many (image, position) pairs. Each node
keeps rows ``[0 | -inf | clean activation NHWC | recomputed windows]``; a window's input is one ``index_select``
per edge with an index computed once per geometry, K, stride and position list. Where a window covers the whole
map the same code is dense evaluation; the tail always runs dense. Result: equal to the naive loop up to float
summation order (tests/test_incremental_graph.py). Windows of many images batch together in one call (dataset
scale). ``GraphOcclusion.logits(..., positions=)`` computes any list of positions, and ``window_dtype`` runs the
windows in bfloat16 (not exact).

**How approx bounds it** (:mod:`.approx`). The approximate mode changes *which* positions are computed and in
what precision, never how a computed position is propagated (no projective-field truncation: at 32 px it costs
0.045 mean error on net4). An exact coarse grid (step ``coarse``), then level-by-level drill-down: a cell is
refined (its finer grid points computed) when the spread of map values over it and its neighbour cells is at least
``tau``, else bilinearly filled. So every reported value is a computed value or a blend of computed values of a
region whose spread was below ``tau``; ``tau=0`` is exact. bf16 windows add about 0.0006 mean abs error on net4.
Fidelity is measured, not bounded analytically: benchmarks/test_bench_approx.py publishes tau x speed x SSIM x
error on 100 test images.

**The window convolutions.** fp32 windows of wide (>= 128 input channels) 3x3 stride-1 convs run on Winograd
F(2x2, 3x3) on the CPU (:mod:`.winograd`: 2.25x fewer multiplications, rounding at the direct method's level),
the others on oneDNN / cuDNN. At 32 px the exact engine is FLOP-bound, and this is what moved net4's exact map
from 2.5x to ~3.5x Captum.

Older engines: :mod:`.incremental` (the CifarNet chain engine the graph engine generalises; also the GPU path
with :mod:`.triton_occlusion`'s fused first layer), :mod:`.incremental_int8` (the same plan on the int8 convs
of an ``onnx-int8`` artifact, on oneDNN or ONNX Runtime, the same integers either way), :mod:`.bn_fold` (BN
folding).
"""

#: bumped whenever an engine's speed changes for the same model (a new conv algorithm, a new backend), so that
#: ``auto``'s cached timings (their key holds it) are taken again: 2 = Winograd windows, oneDNN int8 convs
ENGINES_REVISION = 2
