"""Filter selections (``layer1.0.conv1:0,1 conv2:0-3``) and the one home of conv-layer geometry.

Layers are named by the model's own names: module paths for a torch model (``layer1.0.conv1``), ``Conv`` node names
for an ONNX graph; the zoo nets (and ONNX exports of them) also answer to ``conv1..convN``, their convs in order,
which stay the names their results show. :func:`layer_table` lists every conv layer of a model with its filter
count (output channels), kernel, stride and receptive field, from the geometry: ``r_out = r_in + (k - 1) * j_in``,
``j_out = j_in * s`` (``k`` the dilated kernel), ``start_out = start_in + ((k - 1) / 2 - p) * j_in``; where paths
join (a residual add, a concat) the path with the largest receptive field wins (max over paths).

A selection is a tuple of ``(layer, filter)`` pairs in net order (layer order, then filter index), without
duplicates, so the same filters always give the same cache keys, tables and file names. The report's default
selection is filters 0 and 1 of the first five conv layers (of every conv layer for nets with fewer than five).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

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
    """One conv layer. ``target``: where it lives (a module path in the torch model, or the ``Conv`` node's name);
    ``name``: what selections and results call it (``target``, or ``convN`` for a zoo net). ``rf``/``jump``/
    ``start``/``out_size``: its output's receptive field in input pixels, the stride of its positions in input
    pixels, the input coordinate of output position 0's centre, and its output side; None where the model's graph
    cannot be read (a TorchScript file). ``probe``: the tensor mining reads (the output of a BatchNorm that is the
    conv's only consumer, else the conv's own output); for ONNX a tensor name, for torch a module path."""

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

    def to_json(self) -> dict:
        return {"name": self.name, "aliases": list(self.aliases), "filters": self.filters,
                "in_channels": self.in_channels, "groups": self.groups, "kernel": list(self.kernel),
                "stride": list(self.stride) if self.stride else None, "receptive_field": self.rf, "jump": self.jump, "start": self.start,
                "out_size": self.out_size}


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

    def receptive_fields(self) -> dict[str, int | None]:
        return {n: layer.rf for n, layer in self.layers.items()}

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
    the ``size`` x ``size`` image (the zoo nets' :func:`cifarbench.nets.receptive_patch`, for any size)."""

    def span(i: int) -> tuple[int, int]:
        centre = layer.start + i * layer.jump
        lo, hi = round(centre - layer.rf / 2), round(centre + layer.rf / 2)
        return max(lo, 0), min(hi, size)

    (y0, y1), (x0, x1) = span(y), span(x)
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
            return _torch_table(model.module, size, model.name, zoo)
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


def _torch_table(module, size: int, name: str, zoo: bool) -> LayerTable:
    module = _unwrap(module)
    convs = _conv_modules(module)
    geometry, note = _fx_geometry(module, size)
    sizes, probes = _hooked_shapes(module, size, [p for p, _ in convs])
    layers = OrderedDict()
    for i, (path, conv) in enumerate(convs, 1):
        weight = conv.weight
        g = geometry.get(path) if geometry is not None else None
        alias = f"conv{i}"
        shown = alias if zoo else path
        # a traced TorchScript conv keeps its weight but not its settings: those stay unknown (None), never guessed
        groups, stride = getattr(conv, "groups", None), getattr(conv, "stride", None)
        layers[shown] = ConvLayer(
            name=shown, target=path, filters=int(weight.shape[0]),
            in_channels=int(weight.shape[1]) * int(groups) if groups else None,
            groups=int(groups) if groups else None, kernel=tuple(int(k) for k in weight.shape[2:]),
            stride=tuple(int(v) for v in stride) if stride else None, rf=g[0] if g else None, jump=g[1] if g else None,
            start=g[2] if g else None, out_size=sizes.get(path), aliases=(path,) if zoo else (),
            probe=probes.get(path, path))
    if not layers:
        raise_no_convs(name)
    return LayerTable(name, size, layers, note)


def raise_no_convs(name: str):
    from .errors import UserError

    raise UserError(f"{name} has no 2-d convolution layers to name; filters are output channels of Conv2d layers")


def _fx_geometry(module, size: int):
    """{conv module path: (rf, jump, start)} from a ``torch.fx`` trace, max over paths; (None, why) when the model
    cannot be traced (TorchScript, data-dependent control flow)."""
    import torch
    import torch.nn.functional as F
    from torch import fx

    if getattr(module, "original_name", None) is not None and not isinstance(module, fx.GraphModule) \
            and isinstance(module, torch.jit.ScriptModule):
        return None, "a TorchScript model has no traceable graph: receptive fields unknown"
    inner = getattr(module, "module", None) if type(module).__name__ == "ExportedModule" else None
    try:
        gm = inner if isinstance(inner, fx.GraphModule) else (
            module if isinstance(module, fx.GraphModule) else fx.symbolic_trace(module))
    except Exception as exc:  # data-dependent control flow and friends: fx cannot trace it
        return None, f"torch.fx cannot trace the model ({type(exc).__name__}): receptive fields unknown"
    mods = dict(gm.named_modules())
    state: dict = {}
    out: dict = {}

    def pair(v):
        return (int(v[0]), int(v[-1])) if isinstance(v, (list, tuple)) else (int(v), int(v))

    def step(prev, k, s, p, d):
        rf, jump, start = prev
        keff = (k - 1) * d + 1
        return rf + (keff - 1) * jump, jump * s, start + ((keff - 1) / 2 - p) * jump

    def arg(n, i, key, default):
        if len(n.args) > i:
            return n.args[i]
        return n.kwargs.get(key, default)

    for n in gm.graph.nodes:
        ins = [state[a] for a in n.all_input_nodes if a in state]
        prev = max(ins, key=lambda t: t[0]) if ins else None
        if n.op == "placeholder":
            state[n] = (1, 1, 0.5) if not state else None
            if state[n] is None:
                del state[n]
            continue
        if prev is None:
            continue
        geo = None   # (k, s, p, d) along one axis (height; the zoo and usual nets are square)
        conv_path = None
        if n.op == "call_module":
            m = mods.get(n.target)
            if isinstance(m, torch.nn.Conv2d):
                conv_path = n.target
                pad = m.padding if not isinstance(m.padding, str) else None
                if pad is None:  # padding="same"/"valid"
                    pad = ((m.kernel_size[0] - 1) * m.dilation[0] // 2,) if m.padding == "same" else (0,)
                geo = (m.kernel_size[0], m.stride[0], pair(pad)[0], m.dilation[0])
            elif isinstance(m, (torch.nn.MaxPool2d, torch.nn.AvgPool2d)):
                d = pair(getattr(m, "dilation", 1))[0]
                geo = (pair(m.kernel_size)[0], pair(m.stride or m.kernel_size)[0], pair(m.padding)[0], d)
        elif n.op == "call_function":
            fname = getattr(n.target, "__name__", str(n.target))
            if n.target in (F.conv2d, torch.conv2d) or "convolution" in fname or fname.startswith("conv2d"):
                w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
                if isinstance(w, fx.Node) and w.op == "get_attr":
                    weight = gm.get_parameter(w.target)
                    conv_path = w.target.rsplit(".", 1)[0] if w.target.endswith(".weight") else w.target
                    k = int(weight.shape[2])
                    geo = (k, pair(arg(n, 3, "stride", 1))[0], pair(arg(n, 4, "padding", 0))[0],
                           pair(arg(n, 5, "dilation", 1))[0])
            elif n.target in (F.max_pool2d, F.avg_pool2d) or "max_pool2d" in fname or "avg_pool2d" in fname:
                k = pair(arg(n, 1, "kernel_size", 1))[0]
                s = arg(n, 2, "stride", None)
                s = pair(s)[0] if s not in (None, [], ()) else k
                d = pair(arg(n, 4, "dilation", 1))[0] if "max" in fname else 1
                geo = (k, s, pair(arg(n, 3, "padding", 0))[0], d)
        state[n] = step(prev, *geo) if geo else prev
        if conv_path is not None and conv_path not in out:
            out[conv_path] = state[n]
    return out, ""


def _hooked_shapes(module, size: int, paths: list[str]):
    """({conv path: output side}, {conv path: module path whose output mining reads}) from one forward of a zeros
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
            sizes.setdefault(path, int(out.shape[-2]))
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
        x = torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu",
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


def onnx_layer_table(proto, size: int, name: str = "model", zoo: bool = False) -> LayerTable:
    """The conv layers of an ONNX graph (weights need not be loaded: shapes are in the initializers' dims)."""
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
    state = {graph_in[0]: (1, 1, 0.5, size)} if graph_in else {}
    layers = OrderedDict()

    def attrs(node):
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    count = 0
    for i, node in enumerate(g.node):
        ins = [state[t] for t in node.input if t in state]
        prev = max(ins, key=lambda t: t[0]) if ins else None
        out_state = prev
        if node.op_type in ("Conv", "MaxPool", "AveragePool") and prev is not None:
            a = attrs(node)
            w = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
            if w is None and node.op_type == "Conv":
                w = shapes.get(node.input[1])
            k = list(a.get("kernel_shape") or (w[2:] if w else [1, 1]))
            s = list(a.get("strides") or [1] * len(k))
            d = list(a.get("dilations") or [1] * len(k))
            pads = list(a.get("pads") or [0] * (2 * len(k)))
            rf, jump, start, side = prev
            keff = (int(k[0]) - 1) * int(d[0]) + 1
            auto = a.get("auto_pad", b"NOTSET")
            auto = auto.decode() if isinstance(auto, bytes) else auto
            if auto in ("SAME_UPPER", "SAME_LOWER") and side is not None:
                out = -(-side // int(s[0]))
                total = max((out - 1) * int(s[0]) + keff - side, 0)
                pad_lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
                pad_hi = total - pad_lo
            else:
                pad_lo, pad_hi = int(pads[0]), int(pads[len(k)])
            new_side = None
            if side is not None:
                num = side + pad_lo + pad_hi - keff
                new_side = (-(-num // int(s[0])) if a.get("ceil_mode") else num // int(s[0])) + 1
            out_state = (rf + (keff - 1) * jump, jump * int(s[0]), start + ((keff - 1) / 2 - pad_lo) * jump,
                         new_side)
            if node.op_type == "Conv":
                count += 1
                inferred_side = (shapes.get(node.output[0]) or [None] * 4)[-2:]
                out_side = inferred_side[0] if inferred_side and inferred_side[0] else new_side
                users = consumers.get(node.output[0], [])
                probe = users[0].output[0] if len(users) == 1 and users[0].op_type == "BatchNormalization" \
                    else node.output[0]
                target = node.name or node.output[0]
                shown = f"conv{count}" if zoo else target
                group = int(a.get("group", 1))
                layers[shown] = ConvLayer(
                    name=shown, target=target, filters=int(w[0]) if w and w[0] else 0,
                    in_channels=int(w[1]) * group if w and w[1] else 0, groups=group,
                    kernel=tuple(int(v) for v in k[:2]), stride=tuple(int(v) for v in s[:2]), rf=out_state[0],
                    jump=out_state[1], start=out_state[2], out_size=out_side, aliases=(target,) if zoo else (),
                    probe=probe)
        elif node.op_type in ("Flatten", "GlobalAveragePool", "GlobalMaxPool", "Gemm", "MatMul", "Reshape",
                              "ReduceMean", "ReduceMax") and prev is not None:
            out_state = (prev[0], prev[1], prev[2], None)
        if out_state is not None:
            for t in node.output:
                state[t] = out_state
    if not layers:
        raise_no_convs(name)
    return LayerTable(name, size, layers)


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


def by_layer(selection: Selection) -> OrderedDict[str, list[int]]:
    out: OrderedDict[str, list[int]] = OrderedDict()
    for layer, j in selection:
        out.setdefault(layer, []).append(j)
    return out


def format_selection(selection: Selection) -> str:
    """The canonical spec string of a selection: ``conv1:0,1 conv2:0,1``."""
    return " ".join(f"{layer}:{','.join(map(str, idx))}" for layer, idx in by_layer(selection).items())
