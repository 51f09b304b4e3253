"""ONNX probe graphs: the net plus, per conv layer, per-filter reductions of its pre-ReLU map as extra outputs.

For conv layer L the probe adds ``probe.L.sum`` (float [N, C]: the spatial sum, the filter response of DESIGN
section 3), ``probe.L.argmax`` (int64 [N, C]: flat position ``y * W + x`` of the first maximum) and
``probe.L.max`` (float [N, C]: the maximum, for the dead-filter check). The reductions run inside the runtime,
on its device, so only [N, C] tensors leave it, never feature maps. The pre-ReLU tensor of ``conv{i}`` is the
input of the graph's i-th ``Relu`` (the body's ReLUs come before the head's in topological order), which holds
whether or not the exporter folded BatchNorm into the conv.

The reductions are chosen for ONNX Runtime's CPU provider, which runs convs in a blocked NCHWc layout and fuses
Conv+Relu; a probe breaks that fusion and every consumer that needs plain NCHW costs a layout reorder of the whole
map, so each map is read as few times as possible:
- max and first argmax come from one ``TopK`` with k=1 (ties go to the lower index, as ONNX specifies): one
  pass instead of ``ReduceMax`` plus a slow ``ArgMax``, on the same NCHW copy of the map as the ``ReduceSum``
  (kept rather than an NCHWc ``GlobalAveragePool`` times H*W, whose different rounding reorders near-ties);
- where a 2x2 ``MaxPool`` follows the ReLU, the pool is moved before it (``relu(maxpool(x)) == maxpool(relu(x))``
  exactly), so the unfused ReLU runs on a quarter of the map.
"""
from __future__ import annotations

from ..errors import UserError

PREFIX = "probe."


def output_names(layer: str) -> tuple[str, str, str]:
    return f"{PREFIX}{layer}.sum", f"{PREFIX}{layer}.argmax", f"{PREFIX}{layer}.max"


def pre_relu_tensors(proto, model) -> dict[str, str]:
    """Conv layer name -> name of its pre-ReLU tensor in ``proto``."""
    names = list(model.conv_blocks())
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    relus = [n.input[0] for n in proto.graph.node if n.op_type == "Relu"][:len(names)]
    if len(relus) != len(names) or any(producers.get(t) not in ("Conv", "BatchNormalization") for t in relus):
        raise UserError(f"cannot locate the {len(names)} conv layers of {model.name} in the ONNX graph")
    return dict(zip(names, relus))


def _pools_before_relus(graph, tensors) -> None:
    """Swap ``Relu -> MaxPool`` into ``MaxPool -> Relu`` after each of ``tensors`` where the pool is the ReLU's only
    consumer (exact: max pooling commutes with the monotone ReLU); the pool's output name is kept for the rest of
    the graph, and the node order stays topological."""
    import onnx

    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node]
    outputs = {o.name for o in graph.output}
    for relu in [n for n in nodes if n.op_type == "Relu" and n.input[0] in tensors]:
        users = [n for n in nodes if relu.output[0] in n.input]
        if len(users) != 1 or users[0].op_type != "MaxPool" or relu.output[0] in outputs:
            continue
        pool, pooled, gone = users[0], users[0].output[0], relu.output[0]
        pool.input[0], pool.output[0] = relu.input[0], f"{pooled}.pre_relu"
        relu.input[0], relu.output[0] = pool.output[0], pooled
        stale = [v for v in graph.value_info if v.name == gone]
        for v in stale:
            graph.value_info.remove(v)
        nodes.remove(relu)
        nodes.insert(nodes.index(pool) + 1, relu)
    del graph.node[:]
    graph.node.extend(nodes)


def probe_graph(proto, model, layers=None):
    """A copy of ``proto`` with the probe outputs of ``layers`` (default: every conv layer) added."""
    import onnx
    from onnx import TensorProto, helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 18:
        raise UserError(f"probe graphs need ONNX opset >= 18, the model has {opset}")
    tensors = pre_relu_tensors(out, model)
    blocks = model.conv_blocks()
    batch = g.input[0].type.tensor_type.shape.dim[0]
    g.initializer.extend([helper.make_tensor(f"{PREFIX}axes_hw", TensorProto.INT64, [2], [2, 3]),
                          helper.make_tensor(f"{PREFIX}shape_nc", TensorProto.INT64, [2], [0, -1]),
                          helper.make_tensor(f"{PREFIX}shape_nc_", TensorProto.INT64, [3], [0, 0, -1]),
                          helper.make_tensor(f"{PREFIX}k1", TensorProto.INT64, [1], [1])])
    layers = layers or list(tensors)
    _pools_before_relus(g, {tensors[layer] for layer in layers})
    for layer in layers:
        t = tensors[layer]
        s, am, mx = output_names(layer)
        p = f"{PREFIX}{layer}."
        g.node.extend([
            helper.make_node("ReduceSum", [t, f"{PREFIX}axes_hw"], [s], keepdims=0, name=s),
            helper.make_node("Reshape", [t, f"{PREFIX}shape_nc_"], [f"{p}flat"], name=f"{p}flat"),
            helper.make_node("TopK", [f"{p}flat", f"{PREFIX}k1"], [f"{p}top", f"{p}topi"], axis=-1, largest=1,
                             sorted=1, name=f"{p}top"),
            helper.make_node("Reshape", [f"{p}top", f"{PREFIX}shape_nc"], [mx], name=mx),
            helper.make_node("Reshape", [f"{p}topi", f"{PREFIX}shape_nc"], [am], name=am),
        ])
        for name, dtype in ((s, TensorProto.FLOAT), (am, TensorProto.INT64), (mx, TensorProto.FLOAT)):
            vi = helper.make_tensor_value_info(name, dtype, [None, blocks[layer].conv.out_channels])
            vi.type.tensor_type.shape.dim[0].CopyFrom(batch)
            g.output.append(vi)
    onnx.checker.check_model(out)
    return out
