"""Filter selections (``layer1.0.conv1:0,1 conv2:0-3``) and the one home of conv-layer geometry.

Layers are named by the model's own names: module paths for a torch model (``layer1.0.conv1``), ``Conv`` node names
for an ONNX graph; the zoo nets (and ONNX exports of them) also answer to ``conv1..convN``, their convs in order,
which stay the names their results show. :func:`layer_table` lists every conv layer of a model with its filter
count (output channels), kernel, stride and receptive field, from the geometry, along each axis (height, width) on
its own: ``r_out = r_in + (k - 1) * j_in``, ``j_out = j_in * s`` (``k`` the dilated kernel), ``start_out = start_in
+ ((k - 1) / 2 - p) * j_in``; where paths join (a residual add, a concat) the field is the union of the paths'
fields (the largest one where they are centred alike: max over paths). An adaptive pool is followed where it is a
fixed pool (input side divisible by output side), a mean or max over both spatial axes (keeping them) as a global
pool, constant padding (``ZeroPad2d``, ``F.pad``, an ONNX ``Pad`` in constant mode) as a shift, ``start -= pad_begin
* j``; a ceil-mode pool drops a last window that would start in the end padding (PyTorch's rule, which ONNX Runtime
follows and ONNX shape inference does not: sizes come from this arithmetic first). After any op whose geometry is
not known exactly (an interpolation, a pixel shuffle, a reshape, reflect padding, an adaptive pool that is not a
fixed window, paths of different strides meeting, e.g. a map times a globally pooled gate) the geometry of every conv
downstream is unknown (None), never guessed; such a conv is still listed (and can be selected, zeroed and mined).

A selection is a tuple of ``(layer, filter)`` pairs in net order (layer order, then filter index), without
duplicates, so the same filters always give the same cache keys, tables and file names. The report's default
selection is filters 0 and 1 of the first five conv layers (of every conv layer for nets with fewer than five).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from .errors import UserError

Selection = tuple[tuple[str, int], ...]

DEFAULT_LAYERS = 5
DEFAULT_FILTERS = (0, 1)
_SPEC = re.compile(r"^(.+):(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)$")


def split_specs(specs: Iterable[str] | None) -> list[str]:
    """Specs given as separate arguments, or several in one argument separated by spaces or semicolons."""
    return [tok for spec in specs or () for tok in re.split(r"[\s;]+", spec.strip()) if tok]


#: largest filter index a spec may name before it is checked against a net: far above any conv layer's width
#: (net4's widest has 512), small enough that expanding a checked range can never take much memory
MAX_INDEX = 1 << 16


def parse_ranges(specs: Iterable[str]) -> dict[str, list[tuple[int, int]]]:
    """Syntax only, nothing expanded: ``["conv1:0,1", "conv3:4-6"]`` -> ``{"conv1": [(0, 0), (1, 1)],
    "conv3": [(4, 6)]}``. A range is checked against a layer's width before it becomes a list of indices, so
    ``conv1:0-300000000`` costs nothing."""
    out: dict[str, list[tuple[int, int]]] = {}
    for tok in split_specs(specs):
        m = _SPEC.match(tok)
        shown = repr(tok if len(tok) <= 60 else tok[:57] + "...")  # one readable line, whatever was typed
        if not m:
            raise UserError(f"malformed filter spec {shown}; expected LAYER:I[,J,...] with ranges I-J, "
                            f"e.g. conv1:0,1 conv3:4-7")
        ranges = out.setdefault(m.group(1), [])
        for part in m.group(2).split(","):
            lo, _, hi = part.partition("-")
            # a digit string too long for int() (Python refuses > 4300 digits) is simply out of range
            if len(lo) > 9 or len(hi) > 9:
                raise UserError(f"filter index out of range in {shown}")
            lo_i, hi_i = int(lo), int(hi or lo)
            if hi_i < lo_i:
                raise UserError(f"empty filter range {part!r} in {shown} (the range is reversed)")
            ranges.append((lo_i, hi_i))
    return out


def parse_filters(specs: Iterable[str]) -> dict[str, list[int]]:
    """Syntax only: ``["conv1:0,1", "conv3:4-6"]`` -> ``{"conv1": [0, 1], "conv3": [4, 5, 6]}``. Indices above
    :data:`MAX_INDEX` are refused before expanding (no net has that many filters)."""
    out: dict[str, list[int]] = {}
    for layer, ranges in parse_ranges(specs).items():
        for lo, hi in ranges:
            if hi >= MAX_INDEX:
                raise UserError(f"filter index {hi} in {layer} is out of range (no conv layer has "
                                f"{MAX_INDEX} filters)")
        out[layer] = [j for lo, hi in ranges for j in range(lo, hi + 1)]
    return out


@dataclass(frozen=True)
class ConvLayer:
    """One conv layer. ``target``: where it lives (a module path in the torch model, the ``Conv`` node's name, or for
    a ``torch.export`` graph the conv's weight's path); ``name``: what selections and results call it (``target``, or
    ``convN`` for a zoo net). Geometry, per axis ``(height, width)``: ``rf_hw``/``jump_hw``/``start_hw`` are its
    output's receptive field in input pixels, the stride of its positions in input pixels and the input coordinate
    of output position 0's centre; ``out_hw`` its output's size. ``rf``/``jump``/``start``/``out_size`` are the same
    numbers where both axes agree (every square net), else None. All None where they cannot be computed exactly (a
    TorchScript file, an op after which positions cannot be mapped to pixels): unknown, never guessed. ``probe``:
    the tensor mining reads (the output of a BatchNorm that is the conv's only consumer, else the conv's own
    output); for ONNX a tensor name, for torch a module path. ``node``: for a conv that is a call in a torch
    ``fx`` graph (a ``torch.export`` program) rather than a module, the graph node of the conv; ``probe`` is then the
    graph node mining reads, ``weight``/``bias`` the parameters the conv reads (what zeroing a filter edits)."""

    name: str
    target: str
    filters: int
    in_channels: int | None
    groups: int | None
    kernel: tuple[int, int]
    stride: tuple[int, int] | None
    rf: int | None = None
    jump: int | None = None
    start: float | None = None
    out_size: int | None = None
    aliases: tuple[str, ...] = ()
    probe: str | None = None
    rf_hw: tuple[int, int] | None = None
    jump_hw: tuple[int, int] | None = None
    start_hw: tuple[float, float] | None = None
    out_hw: tuple[int, int] | None = None
    node: str | None = None
    weight: str | None = None
    bias: str | None = None

    def __post_init__(self):
        # square numbers given alone (older callers): both axes; per-axis numbers given: the square ones where equal
        for one, two in (("rf", "rf_hw"), ("jump", "jump_hw"), ("start", "start_hw"), ("out_size", "out_hw")):
            a, b = getattr(self, one), getattr(self, two)
            if b is None and a is not None:
                object.__setattr__(self, two, (a, a))
            elif b is not None:
                object.__setattr__(self, one, b[0] if b[0] == b[1] else None)

    @property
    def geometry_known(self) -> bool:
        return self.rf_hw is not None and self.jump_hw is not None and self.start_hw is not None

    def to_json(self) -> dict:
        hw = (lambda v: list(v) if v is not None else None)
        return {"name": self.name, "aliases": list(self.aliases), "filters": self.filters,
                "in_channels": self.in_channels, "groups": self.groups, "kernel": list(self.kernel),
                "stride": list(self.stride) if self.stride else None, "receptive_field": self.rf, "jump": self.jump,
                "start": self.start, "out_size": self.out_size, "receptive_field_hw": hw(self.rf_hw),
                "jump_hw": hw(self.jump_hw), "start_hw": hw(self.start_hw), "out_hw": hw(self.out_hw)}


@dataclass
class LayerTable:
    """Every conv layer of a model in order, looked up by name or alias."""

    model: str
    input_size: int
    layers: OrderedDict = field(default_factory=OrderedDict)   # name -> ConvLayer
    note: str = ""                                             # why geometry is missing, if it is

    def __post_init__(self):
        self._names = {}
        for layer in self.layers.values():
            for n in (layer.name, layer.target, *layer.aliases):
                self._names.setdefault(n, layer.name)

    def canonical(self, name: str) -> str | None:
        return self._names.get(name)

    def __getitem__(self, name: str) -> ConvLayer:
        return self.layers[self._names[name]]

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def channels(self) -> OrderedDict[str, int]:
        return OrderedDict((n, layer.filters) for n, layer in self.layers.items())

    def receptive_fields(self) -> dict[str, int | list[int] | None]:
        """Layer -> receptive field: one number for a square field, ``[height, width]`` for a non-square one,
        None where it is unknown."""
        return {n: (layer.rf if layer.rf is not None else list(layer.rf_hw) if layer.rf_hw else None)
                for n, layer in self.layers.items()}

    def listing(self, limit: int = 12) -> str:
        names = list(self.layers)
        shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all; see `cifarbench layers`)"
                                            if len(names) > limit else "")
        return shown or "none"

    def to_json(self) -> dict:
        return {"model": self.model, "input_size": self.input_size, "note": self.note or None,
                "layers": [layer.to_json() for layer in self.layers.values()]}


def receptive_patch(layer: ConvLayer, y: int, x: int, size: int) -> tuple[int, int, int, int]:
    """Input-pixel box ``(y0, x0, y1, x1)`` (end-exclusive) seen by output position (y, x) of ``layer``, clipped to
    the ``size`` x ``size`` image (the zoo nets' :func:`cifarbench.nets.receptive_patch`, for any size), each axis
    with its own receptive field, jump and start. A layer whose geometry is unknown has no patch: refused."""
    if not layer.geometry_known:
        raise UserError(f"the receptive field of {layer.name} is unknown, so it has no patch")

    def span(i: int, axis: int) -> tuple[int, int]:
        rf, jump, start = layer.rf_hw[axis], layer.jump_hw[axis], layer.start_hw[axis]
        centre = start + i * jump
        lo, hi = round(centre - rf / 2), round(centre + rf / 2)
        return max(lo, 0), min(hi, size)

    (y0, y1), (x0, x1) = span(y, 0), span(x, 1)
    return y0, x0, y1, x1


# ------------------------------------------------------------------------------------------------ layer tables
def layer_table(model, input_size: int | None = None) -> LayerTable:
    """The conv layers of ``model``: a :class:`cifarbench.source.ModelSource`, a runtime (asked for its
    capabilities: ``torch_module()``, then ``onnx_path()``), a torch module, or a LayerTable (returned as is)."""
    from .errors import UserError

    if isinstance(model, LayerTable):
        return model
    source = getattr(model, "source", None)
    if source is not None and hasattr(source, "input_size") and hasattr(source, "onnx_path"):
        model = source   # a runtime: its source carries the user's own module and names
    if hasattr(model, "input_size") and hasattr(model, "kind") and hasattr(model, "onnx_path"):  # a ModelSource
        size = input_size or model.input_size
        zoo = model.kind in ("zoo", "checkpoint") or "spec" in (model.metadata or {})
        if model.module is not None:
            return _torch_table(model.module, size, model.name, zoo, getattr(model, "fixed_batch", None) or 1)
        if model.onnx_path is not None:
            return _onnx_table(model.onnx_path, size, model.name, zoo)
        raise UserError(f"{model.name} is an AOTInductor package: compiled code without a readable graph, so its "
                        f"layers cannot be named; use the model it was built from (ONNX, state_dict + --arch)")
    import torch

    if isinstance(model, torch.nn.Module):
        from .nets import CifarNet

        return _torch_table(model, input_size or 32, getattr(model, "name", type(model).__name__),
                            isinstance(model, CifarNet))
    raise UserError(f"cannot list the conv layers of a {type(model).__name__}")


def _conv_modules(module) -> list[tuple[str, object]]:
    """(path, conv) of every 2-d convolution module, eager or TorchScript, in definition order."""
    import torch

    out = []
    for path, m in module.named_modules():
        if isinstance(m, torch.nn.Conv2d) or getattr(m, "original_name", None) == "Conv2d":
            out.append((path, m))
    return out


def _unwrap(module):
    """The user's own module behind cifarbench's normalizing wrapper (whose ``.model`` is it)."""
    return module.model if type(module).__name__ == "NormalizedModel" and hasattr(module, "model") else module


def graph_module_of(module):
    """``(graph module, its path in module)`` of a ``torch.export`` program's module inside ``module`` (behind
    cifarbench's normalizing wrapper and ``ExportedModule``), else ``(None, None)``. Its convs are calls in the
    graph, not modules: they are named, zeroed and probed through the graph."""
    from torch import fx

    for path, m in module.named_modules():
        if isinstance(m, fx.GraphModule):
            return (m, path) if type(_unwrap(module)).__name__ == "ExportedModule" or path == "" else (None, None)
    return None, None


def _torch_table(module, size: int, name: str, zoo: bool, batch: int = 1) -> LayerTable:
    module = _unwrap(module)
    convs = _conv_modules(module)
    graph, _ = graph_module_of(module)
    if type(module).__name__ == "ExportedModule" and graph is None:
        graph = getattr(module, "program", None)
    geo = _fx_geometry(graph if graph is not None else module, size, batch)
    if not convs and geo.graph_convs:   # a torch.export program: its convs are calls in its graph
        return _graph_table(geo, size, name, zoo)
    sizes, probes = _hooked_shapes(module, size, [p for p, _ in convs], batch)
    layers = OrderedDict()
    for i, (path, conv) in enumerate(convs, 1):
        weight = conv.weight
        g = geo.convs.get(path)
        alias = f"conv{i}"
        shown = alias if zoo else path
        # a traced TorchScript conv keeps its weight but not its settings: those stay unknown (None), never guessed
        groups, stride = getattr(conv, "groups", None), getattr(conv, "stride", None)
        layers[shown] = ConvLayer(
            name=shown, target=path, filters=int(weight.shape[0]),
            in_channels=int(weight.shape[1]) * int(groups) if groups else None,
            groups=int(groups) if groups else None, kernel=tuple(int(k) for k in weight.shape[2:]),
            stride=tuple(int(v) for v in stride) if stride else None, aliases=(path,) if zoo else (),
            probe=probes.get(path, path), **_geo_fields(g, sizes.get(path)))
    if not layers:
        raise_no_convs(name)
    return LayerTable(name, size, layers, geo.note)


def _geo_fields(g, out_hw=None) -> dict:
    """ConvLayer's per-axis fields from a conv's ((rf, jump, start) per axis, (H, W) or None) (None: unknown)."""
    if g is None or isinstance(g, _Unknown):
        return {"out_hw": out_hw}
    axes, hw = g
    return {"rf_hw": (axes[0][0], axes[1][0]), "jump_hw": (axes[0][1], axes[1][1]),
            "start_hw": (axes[0][2], axes[1][2]), "out_hw": hw or out_hw}


def _graph_table(geo, size: int, name: str, zoo: bool) -> LayerTable:
    """The conv calls of a ``torch.export`` program's graph, named by the path of the weight each reads (its
    module's path in the exported model: ``conv1``, ``block.0.0``)."""
    layers = OrderedDict()
    for i, c in enumerate(geo.graph_convs, 1):
        alias = f"conv{i}"
        shown = alias if zoo else c["target"]
        layers[shown] = ConvLayer(
            name=shown, target=c["target"], filters=c["filters"], in_channels=c["in_channels"],
            groups=c["groups"], kernel=c["kernel"], stride=c["stride"], aliases=(c["target"],) if zoo else (),
            probe=c["probe"], node=c["node"], weight=c["weight"], bias=c["bias"],
            **_geo_fields(geo.convs.get(c["node"]), c["out_hw"]))
    if not layers:
        raise_no_convs(name)
    return LayerTable(name, size, layers, geo.note)


def raise_no_convs(name: str):
    from .errors import UserError

    raise UserError(f"{name} has no 2-d convolution layers to name; filters are output channels of Conv2d layers")


# ------------------------------------------------------------------------------------------------ geometry
class _Unknown:
    """The geometry of a tensor whose positions cannot be mapped to input pixels exactly, and why."""

    def __init__(self, why: str):
        self.why = why


def _axis_step(axis, k: int, s: int, p: int, d: int = 1):
    """One axis (rf, jump, start) through a window op: ``r + (k_eff - 1) j``, ``j s``, ``start + ((k_eff - 1) / 2
    - p) j`` (``p``: the padding before the first position)."""
    rf, jump, start = axis
    keff = (k - 1) * d + 1
    return rf + (keff - 1) * jump, jump * s, start + ((keff - 1) / 2 - p) * jump


def _join(states: list, where: str):
    """Where paths meet (an add, a concat, a multiply): per axis the union of the paths' fields, which is one
    field per position only when the paths' jumps agree (else, e.g. a 1x1 gate broadcast over a map, unknown)."""
    for s in states:
        if isinstance(s, _Unknown):
            return s
    if len(states) == 1:
        return states[0]
    out = []
    for a in range(2):
        axes = [s[a] for s in states]
        if len({j for _, j, _ in axes}) != 1:
            return _Unknown(f"paths with different strides in input pixels meet at {where}")
        lo = min(st - rf / 2 for rf, _, st in axes)
        hi = max(st + rf / 2 for rf, _, st in axes)
        out.append((int(round(hi - lo)), axes[0][1], (lo + hi) / 2))
    return tuple(out)


def _pair(v):
    """``(h, w)`` of a kernel/stride/padding argument; None where it is not given (``F.max_pool2d(x, 2)`` passes no
    stride: the caller's default applies)."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        if len(v) == 0:
            return None
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


#: element-wise or per-channel torch ops (module types, function/method names): positions map through unchanged
_POINTWISE_NAMES = frozenset("""
relu relu_ relu6 hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu selu_ celu celu_ gelu silu silu_ mish mish_
hardswish hardswish_ hardsigmoid hardsigmoid_ sigmoid sigmoid_ tanh tanh_ softplus softsign prelu logsigmoid
threshold threshold_ tanhshrink dropout dropout_ dropout2d feature_dropout alpha_dropout feature_alpha_dropout
batch_norm _native_batch_norm_legit_no_training add add_ iadd sub sub_ isub rsub mul mul_ imul truediv itruediv
div div_ neg abs exp sqrt rsqrt pow erf clamp clamp_ clamp_min clamp_min_ clamp_max clamp_max_ clip clip_
contiguous clone detach to float half double type_as _to_copy alias lift_fresh_copy identity
""".split())
_META_NAMES = frozenset("size dim numel sym_size sym_numel getattr".split())
_TUPLE_OPS = frozenset({"_native_batch_norm_legit_no_training", "max_pool2d_with_indices"})


def _pointwise_module(m) -> bool:
    from torch import nn

    kinds = (nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout,
             nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
             nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
             nn.Threshold, nn.LogSigmoid)
    return isinstance(m, kinds)


def _fname(target) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[0] if "aten" in str(target) or hasattr(target, "_schema") else name


def _args(n, names: tuple[str, ...]) -> dict:
    """A call node's arguments by name (``names`` in positional order; keyword arguments by their name)."""
    out = dict(zip(names, n.args))
    out.update(n.kwargs)
    return out


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                     "groups")
_MAXPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
_AVGPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode")
_ADAPTIVE_ARGS = ("input", "output_size")


@dataclass
class _Geometry:
    convs: dict = field(default_factory=dict)          # conv key (module path or graph node name) -> state, (H, W)
    graph_convs: list = field(default_factory=list)    # the conv calls of a graph whose weights are parameters
    note: str = ""


def _conv_padding(padding, k: tuple[int, int], d: tuple[int, int]) -> tuple[int, int] | None:
    """Padding before the first position per axis; ``'same'`` pads ``total // 2`` first (torch's rule)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            return tuple(((kk - 1) * dd) // 2 for kk, dd in zip(k, d))
        return None
    return _pair(padding) or (0, 0)


def _fx_geometry(module, size: int, batch: int = 1) -> _Geometry:
    """Per conv (module path, or graph node name for a conv call), its per-axis ``(rf, jump, start)`` and output
    size from a ``torch.fx`` graph (a ``torch.export`` program's, or a symbolic trace), with shapes from running it
    once on zeros. Only ops whose geometry is known exactly are followed: convs, fixed pools, adaptive pools where
    they are fixed pools (input divisible by output), spatial means/maxes kept as 1x1 maps (global pools), constant
    padding, element-wise and per-channel ops; after anything else (an interpolation, a pixel shuffle, a reshape, a
    pool that is not a fixed window) positions no longer map to input pixels, and every conv downstream gets an
    unknown geometry, never a guessed one. Every conv call of a graph is in ``graph_convs``, known or not."""
    import torch
    from torch import fx

    geo = _Geometry()
    if getattr(module, "original_name", None) is not None and not isinstance(module, fx.GraphModule) \
            and isinstance(module, torch.jit.ScriptModule):
        geo.note = "a TorchScript model has no traceable graph: receptive fields unknown"
        return geo
    try:
        gm = module if isinstance(module, fx.GraphModule) else fx.symbolic_trace(module)
    except Exception as exc:  # data-dependent control flow and friends: fx cannot trace it
        geo.note = f"torch.fx cannot trace the model ({type(exc).__name__}): receptive fields unknown"
        return geo
    shapes = _fx_shapes(gm, size, batch)
    mods = dict(gm.named_modules())
    state: dict = {}

    def hw(n):
        s = shapes.get(n)
        return (int(s[-2]), int(s[-1])) if s is not None and len(s) == 4 else None

    def window(prev, k, s, p, d=(1, 1)):
        return tuple(_axis_step(prev[a], k[a], s[a], p[a], d[a]) for a in range(2))

    def adaptive(prev, n, out_size, what):
        src = hw(n.all_input_nodes[0]) if n.all_input_nodes else None
        if src is None:
            return _Unknown(f"{what} at {n.name}: its input size is unknown")
        want = out_size if isinstance(out_size, (list, tuple)) else (out_size, out_size)
        if len(want) == 1:
            want = (want[0], want[0])
        ks = []
        for a in range(2):
            o = src[a] if want[a] is None else int(want[a])
            if o <= 0 or src[a] % o:
                return _Unknown(f"{what} at {n.name} maps {src[0]}x{src[1]} to "
                                f"{want[0] or src[0]}x{want[1] or src[1]}: not a fixed window, so its positions "
                                f"have no one receptive field")
            ks.append(src[a] // o)
        return window(prev, ks, ks, (0, 0))

    def conv_geo(prev, weight_shape, a):
        k = (int(weight_shape[2]), int(weight_shape[3]))
        d = _pair(a.get("dilation", 1)) or (1, 1)
        s = _pair(a.get("stride", 1)) or (1, 1)
        p = _conv_padding(a.get("padding", 0), k, d)
        if p is None:
            return _Unknown(f"padding {a.get('padding')!r}")
        return window(prev, k, s, p, d)

    def pool_geo(prev, a, dilation=True):
        k = _pair(a.get("kernel_size"))
        s = _pair(a.get("stride")) or k
        p = _pair(a.get("padding", 0)) or (0, 0)
        d = (_pair(a.get("dilation", 1)) or (1, 1)) if dilation else (1, 1)
        return window(prev, k, s, p, d)

    def conv_call(n):
        """(arguments by name, weight node, weight shape or None) of a conv call."""
        a = _args(n, _CONVOLUTION_ARGS if _fname(n.target) == "convolution" else _CONV_ARGS)
        w = a.get("weight")
        wshape = shapes.get(w) if isinstance(w, fx.Node) else None
        if isinstance(w, fx.Node) and w.op == "get_attr":
            try:
                wshape = tuple(fetch_attr(gm, w.target).shape)
            except AttributeError:
                pass
        return a, w, wshape

    def pad_geo(prev, n, pads, mode="constant"):
        """Constant padding (``F.pad``, ``ZeroPad2d``, ``aten.constant_pad_nd``): pads ``(left, right, top,
        bottom, ...)``, the last axis first. Position 0 moves ``pad_begin`` positions before the old one: start -=
        pad_begin * jump, rf and jump unchanged (a negative pad crops: the same formula). Reflect, replicate and
        circular padding copy pixels to other positions: unknown."""
        if mode not in ("constant", None):
            return _Unknown(f"{mode} padding ({n.name}) copies pixels to other positions")
        pads = list(pads) if isinstance(pads, (list, tuple)) else None
        if not pads or len(pads) % 2 or not all(isinstance(v, int) for v in pads):   # a computed pad: unknown
            return _Unknown(f"padding {pads!r} ({n.name})")
        begin = (pads[2] if len(pads) >= 4 else 0, pads[0])   # (height, width)
        return tuple((rf, j, st - begin[a] * j) for a, (rf, j, st) in enumerate(prev))

    def global_reduce(prev, n, dims, keepdim):
        """``x.mean((2, 3), keepdim=True)`` and friends: one window over the whole map (a global pool)."""
        src = hw(n.all_input_nodes[0]) if n.all_input_nodes else None
        dims = [dims] if isinstance(dims, int) else list(dims or ())
        if src is None or not keepdim or sorted(d % 4 for d in dims) != [2, 3]:
            return _Unknown(f"{_fname(n.target) if n.op == 'call_function' else n.target} ({n.name})")
        return window(prev, src, src, (0, 0))

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if not state:
                state[n] = ((1, 1, 0.5), (1, 1, 0.5))
            continue
        if n.op in ("get_attr", "output"):
            continue
        ins = [state[a] for a in n.all_input_nodes if a in state]
        if not ins:
            continue   # a constant, or arithmetic on shapes: no positions of the image
        prev = ins[0]
        known = [s for s in ins if not isinstance(s, _Unknown)]
        carriers = [a for a in n.all_input_nodes if a in state]
        new = None
        conv_key = None
        if any(isinstance(s, _Unknown) for s in ins):
            new = next(s for s in ins if isinstance(s, _Unknown))
            if n.op == "call_module" and isinstance(mods.get(n.target), torch.nn.Conv2d):
                conv_key = n.target
            elif n.op == "call_function" and _fname(n.target) in ("conv2d", "convolution"):
                a, w, wshape = conv_call(n)
                if not a.get("transposed") and wshape is not None and len(wshape) == 4:
                    conv_key = n.name
                    if isinstance(w, fx.Node) and w.op == "get_attr":   # listed, its geometry unknown
                        geo.graph_convs.append(_graph_conv(gm, n, w, a, wshape))
        elif n.op == "call_module":
            m = mods.get(n.target)
            if isinstance(m, torch.nn.Conv2d):
                conv_key = n.target
                if getattr(m, "padding_mode", "zeros") == "circular":
                    new = _Unknown(f"circular padding of {n.target} wraps positions around the image")
                else:
                    new = conv_geo(prev, m.weight.shape, {"stride": m.stride, "padding": m.padding,
                                                          "dilation": m.dilation})
            elif isinstance(m, torch.nn.MaxPool2d):
                new = pool_geo(prev, {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                                      "dilation": m.dilation})
            elif isinstance(m, torch.nn.AvgPool2d):
                new = pool_geo(prev, {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding},
                               dilation=False)
            elif isinstance(m, (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d)):
                new = adaptive(prev, n, m.output_size, type(m).__name__)
            elif isinstance(m, torch.nn.ConstantPad2d):   # ZeroPad2d too
                new = pad_geo(prev, n, m.padding)
            elif _pointwise_module(m):
                new = _join_shapes(known, n, shapes, carriers)
            else:
                new = _Unknown(f"{type(m).__name__} {n.target!r}")
        elif n.op in ("call_function", "call_method"):
            name = _fname(n.target) if n.op == "call_function" else n.target
            if name in ("conv2d", "convolution"):
                a, w, wshape = conv_call(n)
                if a.get("transposed"):
                    new = _Unknown(f"transposed convolution {n.name}")
                elif wshape is None or len(wshape) != 4:
                    new = _Unknown(f"convolution {n.name} with a weight of unknown shape")
                else:
                    new = conv_geo(state.get(a.get("input"), prev), wshape, a)
                    conv_key = n.name
                    if isinstance(w, fx.Node) and w.op == "get_attr":
                        geo.graph_convs.append(_graph_conv(gm, n, w, a, wshape))
            elif name in ("max_pool2d", "_max_pool2d", "max_pool2d_with_indices"):
                new = pool_geo(prev, _args(n, _MAXPOOL_ARGS))
            elif name == "avg_pool2d":
                new = pool_geo(prev, _args(n, _AVGPOOL_ARGS), dilation=False)
            elif name in ("adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d"):
                new = adaptive(prev, n, _args(n, _ADAPTIVE_ARGS).get("output_size"), name)
            elif name in ("pad", "constant_pad_nd"):
                a = _args(n, ("input", "pad", "mode", "value") if name == "pad" else ("input", "pad", "value"))
                new = pad_geo(prev, n, a.get("pad"), a.get("mode", "constant"))
            elif name in ("mean", "amax", "sum") and len(n.all_input_nodes) == 1:
                a = _args(n, ("input", "dim", "keepdim"))
                new = global_reduce(prev, n, a.get("dim"), a.get("keepdim", False))
            elif name in ("cat", "concat", "concatenate"):
                a = _args(n, ("tensors", "dim"))
                dim = a.get("dim", 0)
                new = (_join_shapes(known, n, shapes, carriers) if dim in (1, -3)
                       else _Unknown(f"{name} along dim {dim}"))
            elif name == "getitem" and n.args and isinstance(n.args[0], fx.Node) \
                    and _fname(getattr(n.args[0], "target", "")) in _TUPLE_OPS:
                new = prev   # the tensor of a (tensor, statistics/indices) result
            elif name in _META_NAMES:
                continue     # a size or a dim: no positions
            elif name in _POINTWISE_NAMES:
                new = _join_shapes(known, n, shapes, carriers)
            else:
                new = _Unknown(f"{name} ({n.name})")
        else:
            new = _Unknown(n.op)
        state[n] = new
        if conv_key is not None and conv_key not in geo.convs:
            geo.convs[conv_key] = new if isinstance(new, _Unknown) else (new, hw(n))
    first = next((v for v in geo.convs.values() if isinstance(v, _Unknown)), None)
    if first is not None:   # the op that made the first unknown conv's field unknown
        geo.note = (f"receptive fields unknown after {first.why}: its output positions do not map to input pixels "
                    f"exactly")
    return geo


def _join_shapes(states: list, n, shapes: dict, carriers) -> object:
    """:func:`_join` of the inputs that carry positions (``carriers``: their nodes), refusing a broadcast over a
    different spatial size (a constant, e.g. a per-channel scale, carries none and broadcasts freely)."""
    sizes = {tuple(shapes[a][-2:]) for a in carriers if a in shapes and len(shapes[a]) == 4}
    if len(sizes) > 1:
        return _Unknown(f"inputs of different spatial sizes meet at {n.name}")
    return _join(states, n.name)


def fetch_attr(gm, target: str):
    """The attribute a dotted ``get_attr`` target (``block.0.weight``) names under ``gm``."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fx_shapes(gm, size: int, batch: int) -> dict:
    """{node: shape} of every tensor a run of ``gm`` on zeros [batch, 3, size, size] computes; {} if it fails."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    param = next(iter(gm.parameters()), None)
    x = torch.zeros(batch, 3, size, size, device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
    except Exception:
        return {}
    out = {}
    for n in gm.graph.nodes:
        meta = n.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            out[n] = tuple(int(v) for v in meta.shape)
    return out


def _graph_conv(gm, n, w, a, wshape) -> dict:
    """A conv call of a graph: named by its weight's path (``conv1.weight`` -> ``conv1``), probed at the BatchNorm
    that is its only consumer, else at itself."""
    from torch import fx

    target = w.target[:-len(".weight")] if w.target.endswith(".weight") else w.target
    b = a.get("bias")
    groups = int(a.get("groups", 1) or 1)
    users = list(n.users)
    probe = n
    if len(users) == 1 and _fname(users[0].target) in ("batch_norm", "_native_batch_norm_legit_no_training"):
        probe = users[0]
        if _fname(users[0].target) in _TUPLE_OPS:   # (out, mean, var): the getitem 0 is the map
            first = [u for u in users[0].users if _fname(u.target) == "getitem" and u.args[1] == 0]
            probe = first[0] if first else n
    meta = n.meta.get("tensor_meta")
    out_hw = (int(meta.shape[-2]), int(meta.shape[-1])) if meta is not None and hasattr(meta, "shape") else None
    return {"node": n.name, "target": target, "weight": w.target,
            "bias": b.target if isinstance(b, fx.Node) and b.op == "get_attr" else None,
            "filters": int(wshape[0]), "in_channels": int(wshape[1]) * groups, "groups": groups,
            "kernel": (int(wshape[2]), int(wshape[3])), "stride": _pair(a.get("stride", 1)) or (1, 1),
            "probe": probe.name, "out_hw": out_hw}


def _hooked_shapes(module, size: int, paths: list[str], batch: int = 1):
    """({conv path: output (H, W)}, {conv path: module path whose output mining reads}) from one forward of a zeros
    batch: a BatchNorm whose input *is* the conv's output tensor is the place mining reads (the zoo's
    definition: pre-ReLU, after BN)."""
    import torch

    mods = dict(module.named_modules())
    outputs: dict = {}
    sizes: dict = {}
    probes: dict = {}
    handles = []
    alive = []   # the conv outputs stay referenced, so no other tensor reuses their id() during the forward

    def conv_hook(path):
        def fn(_m, _i, out):
            alive.append(out)
            outputs.setdefault(id(out), path)
            sizes.setdefault(path, (int(out.shape[-2]), int(out.shape[-1])))
        return fn

    def bn_hook(path):
        def fn(_m, inputs, _out):
            src = outputs.get(id(inputs[0])) if inputs else None
            if src is not None:
                probes.setdefault(src, path)
        return fn

    try:
        for p in paths:
            handles.append(mods[p].register_forward_hook(conv_hook(p)))
        for p, m in mods.items():
            if isinstance(m, torch.nn.BatchNorm2d):
                handles.append(m.register_forward_hook(bn_hook(p)))
        param = next(iter(module.parameters()), None)
        x = torch.zeros(batch, 3, size, size, device=param.device if param is not None else "cpu",
                        dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
        with torch.no_grad():
            module(x)
    except Exception:  # no hooks (TorchScript) or a model that needs another batch: sizes stay unknown
        return {}, {}
    finally:
        for h in handles:
            h.remove()
    return sizes, probes


def _onnx_table(path, size: int, name: str, zoo: bool) -> LayerTable:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return onnx_layer_table(proto, size, name, zoo)


#: ONNX ops that map positions through unchanged (element-wise, per-channel, casts, quantization)
_ONNX_POINTWISE = frozenset("""
Relu Clip Sigmoid Tanh LeakyRelu PRelu Elu Selu Celu Gelu HardSigmoid HardSwish Softplus Softsign Mish ThresholdedRelu
Add Sub Mul Div Neg Abs Exp Log Sqrt Pow Erf Reciprocal Max Min Sum Mean Where Not Equal Less Greater
BatchNormalization Identity Dropout Cast CastLike QuantizeLinear DequantizeLinear DynamicQuantizeLinear
""".split())
_ONNX_META = frozenset({"Shape", "Size", "Constant", "ConstantOfShape"})


def onnx_layer_table(proto, size: int, name: str = "model", zoo: bool = False) -> LayerTable:
    """The conv layers of an ONNX graph (weights need not be loaded: shapes are in the initializers' dims), with
    each axis's geometry; after an op whose geometry is not known exactly (Resize, DepthToSpace, Reshape, a pool
    that is not a fixed window...), every conv downstream gets an unknown geometry."""
    import onnx

    g = proto.graph
    inits = {t.name: list(t.dims) for t in g.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
        shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                  for v in [*inferred.value_info, *inferred.output, *inferred.input]}
    except Exception:  # a graph shape inference cannot follow: sizes come from the arithmetic alone
        shapes = {}
    consumers: dict = {}
    for node in g.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    graph_in = [i.name for i in g.input if i.name not in inits]
    # per tensor: ((rf, jump, start) per axis, (H, W) with None where unknown), or _Unknown
    state = {graph_in[0]: (((1, 1, 0.5), (1, 1, 0.5)), (size, size))} if graph_in else {}
    layers = OrderedDict()
    first_unknown = None

    def attrs(node):
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def side_of(t, arith):
        """(H, W) of tensor ``t``: the geometry's own arithmetic where it has one (shape inference does not follow
        ONNX Runtime's and PyTorch's ceil-mode rule), else shape inference's, else None."""
        if arith and None not in arith:
            return tuple(int(v) for v in arith)
        s = shapes.get(t)
        if s and len(s) == 4 and s[2] and s[3]:
            return (int(s[2]), int(s[3]))
        return None

    producers = {o: n for n in g.node for o in n.output}
    folded: dict = {}

    def constant(t):
        """The value of tensor ``t`` when it depends on no graph input (an initializer, a Constant, or a small
        subgraph of them, e.g. the legacy exporter's computed Pad amounts, folded here), else None."""
        if not t:
            return None
        if t in folded:
            return folded[t]
        from onnx import numpy_helper

        value = None
        try:
            if t in inits:
                value = numpy_helper.to_array(next(i for i in g.initializer if i.name == t))
            elif t in producers and producers[t].op_type == "Constant":
                value = numpy_helper.to_array(producers[t].attribute[0].t) \
                    if producers[t].attribute[0].name == "value" else None
            elif t in producers:
                needed, todo = {}, [t]
                while todo and len(needed) <= 64:
                    n = producers.get(todo.pop())
                    if n is None or n.name + "/" + n.output[0] in needed:
                        continue
                    if n.op_type in ("Shape", "Size") or any(i in graph_in for i in n.input):
                        return None   # depends on the image: not a constant
                    needed[n.name + "/" + n.output[0]] = n
                    todo += [i for i in n.input if i and i not in inits]
                if todo or not needed:
                    return None
                from onnx.reference import ReferenceEvaluator

                order = [n for n in g.node if (n.name + "/" + n.output[0]) in needed]
                used = {i for n in order for i in n.input}
                sub = onnx.helper.make_graph(order, "const", [], [onnx.helper.make_tensor_value_info(t, 0, None)],
                                             [i for i in g.initializer if i.name in used])
                model = onnx.helper.make_model(sub, opset_imports=list(proto.opset_import))
                value = ReferenceEvaluator(model).run(None, {})[0]
        except Exception:   # noqa: BLE001  (external data, an op the evaluator lacks...): not known
            value = None
        folded[t] = value
        return value

    def window(prev, node, k, s, d, pads, auto, ceil):
        axes, hw = prev
        new_axes, new_hw = [], []
        for a in range(2):
            keff = (int(k[a]) - 1) * int(d[a]) + 1
            side = hw[a] if hw else None
            if auto in ("SAME_UPPER", "SAME_LOWER"):
                if side is None:
                    return _Unknown(f"{node.op_type} {node.name or node.output[0]} pads SAME on an input of "
                                    f"unknown size")
                out = -(-side // int(s[a]))
                total = max((out - 1) * int(s[a]) + keff - side, 0)
                pad_lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
                pad_hi = total - pad_lo
            elif auto == "VALID":
                pad_lo = pad_hi = 0
            else:
                pad_lo, pad_hi = int(pads[a]), int(pads[a + 2])
            new_axes.append(_axis_step(axes[a], int(k[a]), int(s[a]), pad_lo, int(d[a])))
            if side is not None:
                num = side + pad_lo + pad_hi - keff
                out = (-(-num // int(s[a])) if ceil else num // int(s[a])) + 1
                if ceil and (out - 1) * int(s[a]) >= side + pad_lo:
                    out -= 1   # a last window starting in the end padding is dropped (PyTorch's, ORT's rule)
                new_hw.append(out)
            else:
                new_hw.append(None)
        return tuple(new_axes), tuple(new_hw)

    def pad_state(prev, node, a, where):
        """A constant-mode Pad: per axis, position 0 moves ``pad_begin`` positions before the old one (start -=
        pad_begin * jump) and the side grows by both pads; any other mode, or amounts that are not constants:
        unknown."""
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant":
            return _Unknown(f"Pad {where} in {mode} mode copies pixels to other positions")
        pads = a.get("pads")
        if pads is None and len(node.input) > 1:
            pads = constant(node.input[1])
        axes_in = constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if pads is None:
            return _Unknown(f"Pad {where} by amounts that are not constants")
        pads = [int(v) for v in pads]
        rank = len(pads) // 2
        which = [int(v) % 4 for v in axes_in] if axes_in is not None else list(range(4 - rank, 4)) \
            if rank <= 4 else None
        if which is None or len(which) != rank:
            return _Unknown(f"Pad {where} of an unexpected rank")
        begin = {ax: pads[i] for i, ax in enumerate(which)}
        end = {ax: pads[i + rank] for i, ax in enumerate(which)}
        axes, hw = prev
        new_axes = tuple((rf, j, st - begin.get(2 + i, 0) * j) for i, (rf, j, st) in enumerate(axes))
        new_hw = tuple(None if not hw or hw[i] is None else hw[i] + begin.get(2 + i, 0) + end.get(2 + i, 0)
                       for i in range(2))
        return new_axes, new_hw

    count = 0
    for node in g.node:
        ins = [state[t] for t in node.input if t in state]
        if not ins:
            continue
        out_state = None
        a = attrs(node)
        known = [s for s in ins if not isinstance(s, _Unknown)]
        where = node.name or node.output[0]
        if len(known) < len(ins):
            out_state = next(s for s in ins if isinstance(s, _Unknown))
        elif node.op_type in ("Conv", "MaxPool", "AveragePool"):
            w = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
            if w is None and node.op_type == "Conv":
                w = shapes.get(node.input[1])
            k = list(a.get("kernel_shape") or (w[2:] if w else []))
            if len(k) != 2 or any(v is None for v in k):
                out_state = _Unknown(f"{node.op_type} {where} is not 2-d")
            else:
                s = list(a.get("strides") or [1, 1])
                d = list(a.get("dilations") or [1, 1])
                pads = list(a.get("pads") or [0, 0, 0, 0])
                auto = a.get("auto_pad", b"NOTSET")
                auto = auto.decode() if isinstance(auto, bytes) else auto
                out_state = window(ins[0], node, k, s, d, pads, auto, a.get("ceil_mode"))
        elif node.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
            axes, hw = ins[0]
            if hw and None not in hw:   # one window over the whole map
                out_state = (tuple(_axis_step(axes[i], hw[i], hw[i], 0) for i in range(2)), (1, 1))
            else:
                out_state = _Unknown(f"{node.op_type} {where} on an input of unknown size")
        elif node.op_type == "Pad":
            out_state = pad_state(ins[0], node, a, where)
        elif node.op_type in ("ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2"):
            axes, hw = ins[0]
            red = a.get("axes")
            if red is None and len(node.input) > 1:
                red = constant(node.input[1])
            red = sorted(int(v) % 4 for v in red) if red is not None else None
            if red == [2, 3] and a.get("keepdims", 1) and hw and None not in hw:   # a global pool
                out_state = (tuple(_axis_step(axes[i], hw[i], hw[i], 0) for i in range(2)), (1, 1))
            else:
                out_state = _Unknown(f"{node.op_type} {where}")
        elif node.op_type in _ONNX_POINTWISE or (node.op_type == "Concat" and a.get("axis") in (1, -3)):
            in_sizes = {side_of(t, state[t][1]) for t in node.input
                        if t in state and not isinstance(state[t], _Unknown)}
            in_sizes.discard(None)
            if len(in_sizes) > 1:
                out_state = _Unknown(f"inputs of different spatial sizes meet at {where}")
            else:
                joined = _join([st[0] for st in known], where)
                out_state = joined if isinstance(joined, _Unknown) else (joined, known[0][1])
        elif node.op_type in _ONNX_META:
            continue
        else:
            out_state = _Unknown(f"{node.op_type} {where}")
        if node.op_type == "Conv" and isinstance(out_state, _Unknown) and first_unknown is None:
            first_unknown = out_state.why   # the op that made the first unknown conv's field unknown
        if node.op_type == "Conv":
            count += 1
            w = inits.get(node.input[1]) if len(node.input) > 1 else None
            if w is None:
                w = shapes.get(node.input[1])
            users = consumers.get(node.output[0], [])
            probe = users[0].output[0] if len(users) == 1 and users[0].op_type == "BatchNormalization" \
                else node.output[0]
            target = node.name or node.output[0]
            shown = f"conv{count}" if zoo else target
            group = int(a.get("group", 1))
            k = list(a.get("kernel_shape") or (w[2:] if w else [1, 1]))
            s = list(a.get("strides") or [1] * len(k))
            if isinstance(out_state, _Unknown):
                fields = {"out_hw": side_of(node.output[0], None)}
            else:
                axes, hw = out_state
                hw = side_of(node.output[0], hw if hw and None not in hw else None)
                fields = _geo_fields((axes, hw))
            layers[shown] = ConvLayer(
                name=shown, target=target, filters=int(w[0]) if w and w[0] else 0,
                in_channels=int(w[1]) * group if w and w[1] else 0, groups=group,
                kernel=tuple(int(v) for v in k[:2]), stride=tuple(int(v) for v in s[:2]),
                aliases=(target,) if zoo else (), probe=probe, **fields)
        if not isinstance(out_state, _Unknown):
            axes, hw = out_state
            out_state = (axes, side_of(node.output[0], hw))
        for t in node.output:
            state[t] = out_state
    if not layers:
        raise_no_convs(name)
    note = (f"receptive fields unknown after {first_unknown}: its output positions do not map to input pixels "
            f"exactly") if first_unknown else ""
    return LayerTable(name, size, layers, note)


def _table_of(model) -> LayerTable:
    return layer_table(model)


def layer_channels(model) -> OrderedDict[str, int]:
    """Conv layer name -> number of filters, in net order."""
    return _table_of(model).channels()


def default_selection(model) -> Selection:
    layers = list(layer_channels(model).items())[:DEFAULT_LAYERS]
    return tuple((name, j) for name, n in layers for j in DEFAULT_FILTERS if j < n)


def all_filters(model, layers: Iterable[str] | None = None) -> Selection:
    table = _table_of(model)
    channels = table.channels()
    names = list(channels) if layers is None else [table.canonical(n) or n for n in layers]
    return tuple((name, j) for name in names for j in range(channels[name]))


def resolve_selection(model, specs: Iterable[str] | None = None, every: bool = False) -> Selection:
    """The filters to analyse: ``every`` filter of the net, the given specs, or the report's default."""
    given = list(specs or ())
    specs = split_specs(given)
    if given and not specs:  # `--filters ""` names no filter: an empty selection, not the default one
        raise UserError("the filter spec is empty; give LAYER:I[,J,...] (e.g. conv1:0,1) or leave it out")
    if every and specs:
        raise UserError("give either filter specs or --all, not both")
    if every:
        return all_filters(model)
    if not specs:
        return default_selection(model)
    table = _table_of(model)
    channels = table.channels()
    chosen = set()
    for given, ranges in parse_ranges(specs).items():
        layer = table.canonical(given)
        if layer is None:
            raise UserError(f"unknown layer {_short(given)} in {table.model}; its conv layers are "
                            f"{table.listing()}")
        for lo, hi in ranges:  # bounds first: a range is expanded only once it fits the layer
            if hi >= channels[layer]:
                what = f"{layer}:{hi}" if lo == hi else f"{layer}:{lo}-{hi}"
                raise UserError(f"filter {what} out of range: {layer} of {table.model} has "
                                f"{channels[layer]} filters (0..{channels[layer] - 1})")
            chosen.update((layer, j) for j in range(lo, hi + 1))
    order = {name: i for i, name in enumerate(channels)}
    return tuple(sorted(chosen, key=lambda lf: (order[lf[0]], lf[1])))


def resolve_layers(model, spec: str) -> list[str]:
    """``--sweep`` target: one conv layer name, several separated by commas, or ``all``."""
    table = _table_of(model)
    channels = table.channels()
    if spec.strip() == "all":
        return list(channels)
    given = [s for s in re.split(r"[\s,;]+", spec.strip()) if s]
    if not given:
        raise UserError("--sweep needs a conv layer name (e.g. conv3) or 'all'")
    names = []
    for name in given:
        if name not in table:
            raise UserError(f"unknown layer {_short(name)} in {table.model}; its conv layers are {table.listing()}")
        names.append(table.canonical(name))
    return sorted(set(names), key=list(channels).index)


def _short(name: str) -> str:
    return repr(name if len(name) <= 60 else name[:57] + "...")


def check_selection(table: "LayerTable", selection: Selection) -> Selection:
    """``selection`` in ``table``'s names, every (layer, filter) checked: a layer the table holds and a filter
    ``0 <= j < filters``. For selections built by hand in the API (``resolve_selection`` builds checked ones): a
    ``-1`` would zero the last filter through Python's indexing while the results said ``-1``."""
    checked = []
    for layer, j in selection:
        if layer not in table:
            shown = ", ".join(list(table.layers)[:12]) + (", ..." if len(table.layers) > 12 else "")
            raise UserError(f"unknown layer {layer!r}; the model's conv layers are {shown}")
        info = table[layer]
        if isinstance(j, (bool, np.bool_)) or not isinstance(j, (int, np.integer)) or not 0 <= int(j) < info.filters:
            raise UserError(f"{info.name}: filter {j!r} does not exist (it has filters 0-{info.filters - 1})")
        checked.append((info.name, int(j)))
    return tuple(checked)


def by_layer(selection: Selection) -> OrderedDict[str, list[int]]:
    out: OrderedDict[str, list[int]] = OrderedDict()
    for layer, j in selection:
        out.setdefault(layer, []).append(j)
    return out


def format_selection(selection: Selection) -> str:
    """The canonical spec string of a selection: ``conv1:0,1 conv2:0,1``."""
    return " ".join(f"{layer}:{','.join(map(str, idx))}" for layer, idx in by_layer(selection).items())
