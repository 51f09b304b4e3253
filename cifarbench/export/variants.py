"""Filter-zeroed ONNX variants: edit the exported graph's weight initializers, never re-export from torch.

The i-th ``Conv`` node of the graph (in topological order) is conv layer ``conv{i}``. The exporter may fold
BatchNorm into the conv (``W' = W * s``, ``b' = (b - mean) * s + beta``); zeroing ``W'[j]`` then leaves
``b'_j = bn(b_j)``, exactly what the torch variant (``weight[j] = 0``, bias kept) computes before the ReLU. With
``zero_bias`` the torch variant's pre-ReLU value is ``bn(0)``; on a folded graph that is written into ``b'_j``
(computed from the torch net), on an unfolded one the conv bias is set to zero as in torch. Variants are cached
in memory by (the graph's content digest, selection, zero_bias; with zero_bias also the net's weights).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
import torch

from ..errors import UserError
from ..filters import Selection, by_layer

#: how many variant graphs to keep in memory (a sweep through ONNX builds one per filter and uses it once)
CACHE_SIZE = 4
_cache: OrderedDict[tuple, object] = OrderedDict()
_exported: dict[str, object] = {}


def runtime_proto(runtime, model):
    """The fp32 ONNX graph behind a runtime: the one it runs (its ``onnx_graph()`` capability), else ``model``
    exported once per content digest. Reads capabilities only: export never imports runtime."""
    from .onnx import model_digest, to_onnx_proto

    graph = runtime.onnx_graph() if hasattr(runtime, "onnx_graph") else None
    if graph is None:
        graph = getattr(runtime, "proto", None)
    if graph is not None:
        return graph
    key = model_digest(model)
    if key not in _exported:
        _exported[key] = to_onnx_proto(model)
    return _exported[key]


def graph_digest(proto) -> str:
    """sha256 of the serialized graph: its content, never a metadata field (two graphs that claim one source
    checkpoint, e.g. an fp32 and an edited copy, must not share variants)."""
    return hashlib.sha256(proto.SerializeToString()).hexdigest()


def conv_nodes(proto) -> list:
    return [n for n in proto.graph.node if n.op_type == "Conv"]


def layer_convs(proto, model) -> dict[str, object]:
    """Conv layer name -> its ``Conv`` node, checked against the net's conv layers."""
    names = list(model.conv_blocks())
    convs = conv_nodes(proto)
    if len(convs) != len(names):
        raise UserError(f"the ONNX graph has {len(convs)} Conv nodes but {model.name} has {len(names)} conv layers")
    return dict(zip(names, convs))


def onnx_variant(proto, model, selection: Selection, zero_bias: bool = False):
    """A copy of ``proto`` computing the filter-zeroed variant of ``model`` (see the module docstring)."""
    # with zero_bias on a folded graph the variant's biases come from the torch net's BN: the net is in the key too
    from .onnx import model_digest

    net = model_digest(model) if zero_bias else (model.name, tuple(model.conv_blocks()))
    key = (graph_digest(proto), net, tuple(selection), bool(zero_bias))
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    variant = _zeroed(proto, model, selection, zero_bias)
    _cache[key] = variant
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return variant


def _zeroed(proto, model, selection: Selection, zero_bias: bool):
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    convs = layer_convs(out, model)
    consumers = {i for n in out.graph.node if n.op_type == "BatchNormalization" for i in n.input[:1]}
    blocks = model.conv_blocks()
    for layer, idx in by_layer(selection).items():
        node = convs[layer]
        if node.input[1] not in inits or (len(node.input) > 2 and node.input[2] not in inits):
            raise UserError(f"{layer}: the ONNX graph's conv weights are not plain initializers; cannot zero them")
        weight = numpy_helper.to_array(inits[node.input[1]]).copy()
        weight[idx] = 0
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(weight, node.input[1]))
        if not zero_bias:
            continue
        if len(node.input) < 3:
            continue  # no bias to zero
        bias = numpy_helper.to_array(inits[node.input[2]]).copy()
        if node.output[0] in consumers:   # BatchNormalization still in the graph: zero the conv bias as torch does
            bias[idx] = 0
        else:                             # BN folded (or absent): the bias is the pre-ReLU value, bn(0)
            bn = blocks[layer].bn
            with torch.no_grad():
                zeros = torch.zeros(1, bias.shape[0], 1, 1, device=blocks[layer].conv.weight.device)
                bias[idx] = bn(zeros).reshape(-1).cpu().numpy()[idx]
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(bias, node.input[2]))
    return out
