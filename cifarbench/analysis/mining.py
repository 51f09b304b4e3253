"""Filter-response mining (DESIGN section 3): top-K images per filter, max-response patches, dead filters.

One pass over the data serves every layer. Per batch a *probe* returns, for every conv layer, three [B, C]
tensors reduced on the runtime's device: the response (spatial sum of the pre-ReLU map), the flat position of its
first maximum and the maximum itself; the probe's ``widths`` say how wide each map it read was, and the flat
positions are decoded with that width (not the layer table's, nor ONNX shape inference's). The map of a conv
layer is its output, or the output of the BatchNorm that is the conv's only consumer (for the zoo nets: the
pre-ReLU map after BN, as in the report). The torch probe reads the maps with forward hooks on a copy of the model;
the ONNX probe is the runtime's own graph (``onnx_graph()``) with those reductions as extra outputs, opened by
``runtime.variant`` (same device and contract). Layers are named as :mod:`cifarbench.filters` names them. Top-K is
a streaming selection: the running K best are merged with each batch by a stable sort, so memory does not grow with
the data and ties go to the lower image index.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..data import Dataset
from ..errors import UserError
from ..filters import Selection, all_filters, by_layer, check_selection

DEFAULT_BATCH = 250
Probe = Callable[[torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


# ------------------------------------------------------------------------------------------------------ probes
def reduce_map(pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, first argmax as y * W + x, max) over the spatial positions of a [B, C, H, W] map, each [B, C]."""
    b, c = pre.shape[:2]
    flat = pre.permute(0, 2, 3, 1).reshape(b, -1, c)   # a view for channels_last maps: no copy
    mx, am = flat.max(1)
    return flat.sum(1), am, mx


def torch_probe(net, channels_last: bool = False, table=None, fixed_batch: int | None = None) -> Probe:
    """A probe running torch module ``net`` (taking [0, 1] pixels) with a forward hook on every conv layer's probe
    point: the BatchNorm that is the conv's only consumer (the zoo's pre-ReLU, after-BN map), else the conv
    itself. Hooks go on ``net`` itself: give it a copy (``probe_for`` does)."""
    from ..filters import layer_table

    table = layer_table(net) if table is None else table
    found: dict[str, tuple] = {}
    param = next(iter(net.parameters()), None)
    mods = dict(net.named_modules())

    widths: dict[str, int] = {}

    def hook(layer):
        def fn(_module, _inputs, output):
            found[layer] = reduce_map(output)
            widths[layer] = int(output.shape[-1])
        return fn

    graph_layers = [layer for layer in table if table[layer].node is not None]
    if graph_layers:   # a torch.export program: its convs are calls in its graph, recorded by calls added after them
        _record_in_graph(net, table, graph_layers, found, widths)
    for layer in table:
        if table[layer].node is not None:
            continue
        point = table[layer].probe or table[layer].target
        module = mods.get(point, mods.get(f"model.{point}"))   # inside cifarbench's normalizing wrapper or not
        if module is None:
            raise UserError(f"layer {layer} is not in the model's torch module")
        try:
            module.register_forward_hook(hook(layer))
        except RuntimeError:  # TorchScript modules take no hooks
            raise UserError(f"{table.model} is a TorchScript model, whose layers cannot be probed; mine its ONNX "
                            f"export or its state_dict with --arch") from None

    def run(batch: torch.Tensor):
        found.clear()
        if param is not None:
            batch = batch.to(param.device, param.dtype)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        net(batch)
        return dict(found)

    @torch.inference_mode()
    def probe(batch: torch.Tensor):
        if not fixed_batch or len(batch) == fixed_batch:
            return run(batch)
        parts = []   # a graph that takes exactly ``fixed_batch`` images: fed in chunks, the last padded and cut
        for i in range(0, len(batch), fixed_batch):
            chunk = batch[i:i + fixed_batch]
            pad = fixed_batch - len(chunk)
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros(pad, *chunk.shape[1:])])
            parts.append({k: tuple(t[:len(chunk) - pad] for t in v) for k, v in run(chunk).items()})
        return {k: tuple(torch.cat([p[k][i] for p in parts]) for i in range(3)) for k in parts[0]}

    probe.widths = widths   # the width of each map probed: what decodes its flat argmax (filled by each call)
    return probe


def _record_in_graph(net, table, layers, found: dict, widths: dict | None = None) -> None:
    """Add to the ``torch.fx`` graph inside ``net`` (a copy: it is edited), after each layer's probe node, a call
    that stores :func:`reduce_map` of that node's output in ``found[layer]`` (and its width in ``widths``)."""
    from ..filters import graph_module_of

    gm, _ = graph_module_of(net)
    if gm is None:
        raise UserError(f"the layers of {table.model} are calls in a torch.export graph, which the runtime's "
                        f"module does not hold")
    nodes = {n.name: n for n in gm.graph.nodes}

    def recorder(i, layer):
        def record(output):
            found[layer] = reduce_map(output)
            if widths is not None:
                widths[layer] = int(output.shape[-1])
        record.__name__ = record.__qualname__ = f"cifarbench_record_{i}"
        return record

    for i, layer in enumerate(layers):
        node = nodes.get(table[layer].probe) or nodes.get(table[layer].node)
        if node is None:
            raise UserError(f"layer {layer} is not in the model's graph")
        with gm.graph.inserting_after(node):
            gm.graph.call_function(recorder(i, layer), (node,))
    gm.recompile()


def probe_proto(graph, table, layers=None):
    """A copy of ONNX ``graph`` with, per conv layer, its probe tensor (the Conv's output, or the output of the
    BatchNormalization that is its only consumer) reduced inside the graph to three [N, C] outputs (sum, first
    argmax, max), plus its width (``<prefix>width``, a scalar: the flat argmax is decoded with the map's own
    width, not shape inference's): no feature map leaves ONNX Runtime. Returns (proto, {layer: (sum, argmax, max) output
    names})."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.ModelProto()
    proto.CopyFrom(graph)
    g = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    layers = list(layers or table)
    g.initializer.extend([helper.make_tensor("cifarbench.probe.axes_hw", TensorProto.INT64, [2], [2, 3]),
                          helper.make_tensor("cifarbench.probe.shape", TensorProto.INT64, [3], [0, 0, -1]),
                          helper.make_tensor("cifarbench.probe.k1", TensorProto.INT64, [1], [1]),
                          helper.make_tensor("cifarbench.probe.zero3", TensorProto.INT64, [3], [0, 0, 0]),
                          helper.make_tensor("cifarbench.probe.one3", TensorProto.INT64, [3], [1, 1, 1]),
                          helper.make_tensor("cifarbench.probe.axes3", TensorProto.INT64, [3], [0, 1, 2])])
    names = {}
    for i, layer in enumerate(layers):
        t = table[layer].probe
        p = f"cifarbench.probe.{i}."
        s, am, mx = p + "sum", p + "argmax", p + "max"
        if opset >= 13:
            reduce = helper.make_node("ReduceSum", [t, "cifarbench.probe.axes_hw"], [s], keepdims=0, name=s)
        else:
            reduce = helper.make_node("ReduceSum", [t], [s], axes=[2, 3], keepdims=0, name=s)
        g.node.extend([reduce,
                       helper.make_node("Reshape", [t, "cifarbench.probe.shape"], [p + "flat"], name=p + "flat"),
                       helper.make_node("TopK", [p + "flat", "cifarbench.probe.k1"], [p + "max3", p + "am3"],
                                        axis=-1, name=p + "topk"),
                       helper.make_node("Squeeze" if opset < 13 else "Flatten", [p + "max3"], [mx],
                                        **({"axes": [2]} if opset < 13 else {"axis": 1}), name=p + "mx"),
                       helper.make_node("Squeeze" if opset < 13 else "Flatten", [p + "am3"], [am],
                                        **({"axes": [2]} if opset < 13 else {"axis": 1}), name=p + "am")])
        # the width, counted over one row of the map as computed: a Shape node would be folded by ONNX Runtime
        # into shape inference's size, which is wrong where a ceil-mode pool drops a last window
        if opset >= 10:
            g.node.append(helper.make_node("Slice", [t, "cifarbench.probe.zero3", "cifarbench.probe.one3",
                                                     "cifarbench.probe.axes3"], [p + "row"], name=p + "row"))
        else:
            g.node.append(helper.make_node("Slice", [t], [p + "row"], starts=[0, 0, 0], ends=[1, 1, 1],
                                           axes=[0, 1, 2], name=p + "row"))
        g.node.extend([helper.make_node("IsNaN", [p + "row"], [p + "nan"], name=p + "nan"),
                       helper.make_node("Not", [p + "nan"], [p + "num"], name=p + "num"),
                       helper.make_node("Or", [p + "nan", p + "num"], [p + "ones"], name=p + "ones"),
                       helper.make_node("Cast", [p + "ones"], [p + "ones64"], to=TensorProto.INT64,
                                        name=p + "ones64"),
                       helper.make_node("ReduceSum", [p + "ones64"], [p + "width"], keepdims=0, name=p + "width")])
        g.output.extend([helper.make_tensor_value_info(s, TensorProto.FLOAT, None),
                         helper.make_tensor_value_info(am, TensorProto.INT64, None),
                         helper.make_tensor_value_info(mx, TensorProto.FLOAT, None),
                         helper.make_tensor_value_info(p + "width", TensorProto.INT64, [])])
        names[layer] = (s, am, mx)
    return proto, names


def onnx_probe(runtime, table, layers=None) -> Probe:
    """A probe running ``runtime``'s ONNX graph (its ``onnx_graph()`` capability) with :func:`probe_proto`'s
    reductions as extra outputs, opened by ``runtime.variant`` (same device, threads and contract). Batches get
    the source's input contract (normalization; a fixed batch is fed exactly, the last one padded and cut)."""
    from .ablation import graph_table, onnx_graph_of

    graph = onnx_graph_of(runtime)
    table = graph_table(graph, table)
    proto, names = probe_proto(graph, table, layers)
    probed = runtime.variant(proto)
    source = runtime.source
    fixed = probed.fixed_batch or probed.max_batch
    widths: dict[str, int] = {}
    shape_outs = {layer: trio[0].removesuffix("sum") + "width" for layer, trio in names.items()}
    shape_names = set(shape_outs.values())

    def run(x: torch.Tensor) -> dict:
        if not fixed or len(x) == fixed:
            return probed.outputs(x)
        parts = []
        for i in range(0, len(x), fixed):
            chunk = x[i:i + fixed]
            pad = fixed - len(chunk) if probed.fixed_batch else 0
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros(pad, *chunk.shape[1:])])
            parts.append({k: v if k in shape_names else v[:len(chunk) - pad]
                          for k, v in probed.outputs(chunk.contiguous()).items()})
        return {k: parts[0][k] if k in shape_names else torch.cat([p[k] for p in parts]) for k in parts[0]}

    def probe(batch: torch.Tensor):
        x = source.normalize(batch.float().to(probed.device)).contiguous()
        outs = run(x)
        widths.update((layer, int(outs[n])) for layer, n in shape_outs.items())
        # the Flatten'd TopK outputs are [N, C]: max values and flat positions y * W + x, ties to the lower index
        return {layer: tuple(outs[n] for n in trio) for layer, trio in names.items()}

    probe.widths = widths   # the width of each map probed (ONNX Runtime's, not shape inference's)
    return probe


def probe_for(runtime, model) -> Probe:
    """The probe for ``runtime``, asked for its capabilities: its torch module (probed on a deep copy, so hooks stay
    off the user's model), else its source's torch module (a compiled runtime of a torch model: the responses are
    the model's, computed in torch fp32), else its ONNX graph (``onnx_graph()`` + ``variant()``)."""
    import copy

    from ..filters import layer_table
    from .ablation import onnx_graph_of, torch_module_of

    table = layer_table(model)
    source = getattr(runtime, "source", None)
    module = torch_module_of(runtime)
    if module is None and source is not None and getattr(source, "module", None) is not None:
        module = source.torch_module()
    if module is not None:
        return torch_probe(copy.deepcopy(module), getattr(runtime, "channels_last", False), table,
                           getattr(source, "fixed_batch", None))
    if onnx_graph_of(runtime) is not None and hasattr(runtime, "variant"):
        return onnx_probe(runtime, table)
    raise UserError(f"filter mining needs a torch module or an ONNX graph; backend {runtime.name!r} has neither; "
                    f"use --backend torch or onnxruntime")


# ------------------------------------------------------------------------------------------------------ top-K
class StreamingTopK:
    """The K largest values per row over a stream of column blocks, with payloads, ties to the lower index."""

    def __init__(self, rows: int, k: int):
        self.k = k
        self.values = torch.empty(rows, 0)
        self.index = torch.empty(rows, 0, dtype=torch.long)
        self.payload = torch.empty(rows, 0, dtype=torch.long)

    def update(self, values: torch.Tensor, offset: int, payload: torch.Tensor) -> None:
        """``values``/``payload`` [rows, B] for items ``offset .. offset + B - 1``."""
        b = values.shape[1]
        index = torch.arange(offset, offset + b).expand(values.shape[0], b)
        # kept items have lower indices than the new ones and are already in order: a stable sort keeps ties ordered
        v = torch.cat([self.values, values.float()], 1)
        order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :self.k]
        self.values = v.gather(1, order)
        self.index = torch.cat([self.index, index], 1).gather(1, order)
        self.payload = torch.cat([self.payload, payload.long()], 1).gather(1, order)


# ------------------------------------------------------------------------------------------------------ mining
@dataclass
class MiningResult:
    selection: Selection
    top_index: np.ndarray      # [F, K] image indices, best first
    top_response: np.ndarray   # [F, K]
    top_position: np.ndarray   # [F, K, 2] (y, x) of the max in the filter's feature map
    top_patch: np.ndarray      # [F, K, 4] (y0, x0, y1, x1) receptive field of that position, clipped
    labels: np.ndarray         # [F, K] class index of each top image
    classes: tuple[str, ...]
    receptive_fields: dict[str, int | list[int] | None]   # square: one number; else [height, width]; None: unknown
    dead: Selection            # every filter of the net whose pre-ReLU map is <= 0 everywhere on every image
    note: str = ""             # why a layer's receptive field is unknown, where one is

    def to_json(self) -> dict:
        filters = []
        for f, (layer, j) in enumerate(self.selection):
            hist = np.bincount(self.labels[f], minlength=len(self.classes))
            resp = self.top_response[f]
            # a patch of -1s: the layer's receptive field is unknown, so there is no patch (null), never a guess
            entry = {
                "layer": layer, "filter": j,
                "top": [{"index": int(i), "label": self.classes[c], "response": float(r),
                         "patch": None if min(pt) < 0 else [int(p) for p in pt]}
                        for i, c, r, pt in zip(self.top_index[f], self.labels[f], resp, self.top_patch[f])],
                "class_histogram": {c: int(n) for c, n in zip(self.classes, hist)},
                "max_class": self.classes[int(hist.argmax())] if len(resp) else None,
                "mean_top_response": float(resp.mean()) if len(resp) else None,
                "max_response": float(resp[0]) if len(resp) else None,
                "all_top_negative": all_top_negative(resp),
            }
            if any(t["patch"] is None for t in entry["top"]):
                entry["patch_unknown"] = unknown_patch_reason(layer, self.note)
            filters.append(entry)
        return {"filters": filters, "receptive_fields": dict(self.receptive_fields),
                "dead_filters": [{"layer": layer, "filter": j} for layer, j in self.dead],
                "negative_filters": [{"layer": f["layer"], "filter": f["filter"]} for f in filters
                                     if f["all_top_negative"]]}


def unknown_patch_reason(layer: str, note: str = "") -> str:
    """Why ``layer``'s top images have no patch (one line)."""
    return (f"no patch: the receptive field of {layer} is unknown"
            + (f" ({note})" if note else " (see `cifarbench layers`)"))


def all_top_negative(responses) -> bool:
    """True when even a filter's best images give a negative response (spatial sum of the pre-ReLU map < 0): its
    "top" images are only the least negative ones, so they say little about what the filter detects."""
    responses = [float(r) for r in responses]
    return bool(responses) and max(responses) < 0


def mine(runtime, model, data: Dataset, selection: Selection, k: int = 20,
         batch_size: int = DEFAULT_BATCH, probe: Probe | None = None, progress=None) -> MiningResult:
    """Top-``k`` images of each selected filter by response, their max-response patches, and the net's dead
    filters, in one pass over ``data`` through ``runtime``. ``model`` names the layers: a
    :class:`cifarbench.filters.LayerTable`, a source, a runtime or a torch module."""
    from ..filters import layer_table, receptive_patch

    table = layer_table(model if model is not None else runtime)
    if k < 1:
        raise UserError(f"--top must be at least 1, got {k}")
    if not selection:
        raise UserError("no filters selected")
    selection = check_selection(table, selection)
    probe = probe or probe_for(runtime, table)
    layers = by_layer(selection)
    selection = tuple((layer, j) for layer, idx in layers.items() for j in idx)
    channels = table.channels()
    cols = {layer: torch.tensor(idx) for layer, idx in layers.items()}
    tops = {layer: StreamingTopK(len(idx), k) for layer, idx in layers.items()}
    peak = {layer: torch.full((c,), -torch.inf) for layer, c in channels.items()}
    for i in range(0, len(data), batch_size):
        batch = data.images[i:i + batch_size].float().div_(255)
        stats = probe(batch)
        for layer, (s, am, mx) in stats.items():
            peak[layer] = torch.maximum(peak[layer], mx.amax(0).float().cpu())
            if layer in tops:
                c = cols[layer].to(s.device)
                tops[layer].update(s[:, c].T.cpu(), i, am[:, c].T.cpu())
        if progress:
            progress(len(batch))
    idx, resp, pos, patch = [], [], [], []
    probed = getattr(probe, "widths", None) or {}
    for layer, top in tops.items():
        geo = table[layer]
        # the flat argmax is decoded with the width of the map the probe actually read; the table's size only
        # where a probe does not say (a caller's own probe)
        width = probed.get(layer) or (geo.out_hw[1] if geo.out_hw is not None else None)
        if width is None:
            raise UserError(f"the output size of {layer} is unknown, so its max-response positions cannot be "
                            f"placed; mine the model as ONNX or as a state_dict with --arch")
        y, x = top.payload // width, top.payload % width
        idx.append(top.index), resp.append(top.values), pos.append(torch.stack([y, x], -1))
        if not geo.geometry_known:   # no readable graph, or an op with no exact geometry: no patch, never guessed
            patch.append(torch.full((*y.shape, 4), -1, dtype=torch.long))
            continue
        patch.append(torch.tensor([[receptive_patch(geo, int(a), int(b), table.input_size) for a, b in zip(ys, xs)]
                                   for ys, xs in zip(y.tolist(), x.tolist())], dtype=torch.long).reshape(*y.shape, 4))
    top_index = torch.cat(idx).numpy()
    dead = tuple(f for f in all_filters(table) if peak[f[0]][f[1]] <= 0)
    return MiningResult(selection, top_index, torch.cat(resp).numpy(), torch.cat(pos).numpy(),
                        torch.cat(patch).numpy(), data.labels.numpy()[top_index], tuple(data.classes),
                        table.receptive_fields(), dead, table.note)
