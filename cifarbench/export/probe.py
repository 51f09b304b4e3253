"""ONNX probe graphs: the net plus, per conv layer, per-filter reductions of its pre-ReLU map as extra outputs.

For conv layer L the probe adds ``probe.L.sum`` (float [N, C]: the spatial sum, the filter response of DESIGN
section 3), ``probe.L.argmax`` (int64 [N, C]: flat position ``y * W + x`` of the first maximum) and
``probe.L.max`` (float [N, C]: the maximum, for the dead-filter check). The reductions run inside the runtime,
on its device, so only [N, C] tensors leave it, never feature maps. The pre-ReLU tensor of ``conv{i}`` is the
input of the graph's i-th ``Relu`` (the body's ReLUs come before the head's in topological order), which holds
whether or not the exporter folded BatchNorm into the conv.
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
    channels = {n: b.conv.out_channels for n, b in model.conv_blocks().items()}
    batch = g.input[0].type.tensor_type.shape.dim[0]
    g.initializer.extend([helper.make_tensor(f"{PREFIX}axes_hw", TensorProto.INT64, [2], [2, 3]),
                          helper.make_tensor(f"{PREFIX}shape_nc_", TensorProto.INT64, [3], [0, 0, -1])])
    for layer in layers or list(tensors):
        t = tensors[layer]
        s, am, mx = output_names(layer)
        flat = f"{PREFIX}{layer}.flat"
        g.node.extend([
            helper.make_node("ReduceSum", [t, f"{PREFIX}axes_hw"], [s], keepdims=0, name=s),
            helper.make_node("ReduceMax", [t, f"{PREFIX}axes_hw"], [mx], keepdims=0, name=mx),
            helper.make_node("Reshape", [t, f"{PREFIX}shape_nc_"], [flat], name=flat),
            helper.make_node("ArgMax", [flat], [am], axis=2, keepdims=0, select_last_index=0, name=am),
        ])
        for name, dtype in ((s, TensorProto.FLOAT), (am, TensorProto.INT64), (mx, TensorProto.FLOAT)):
            vi = helper.make_tensor_value_info(name, dtype, [None, channels[layer]])
            vi.type.tensor_type.shape.dim[0].CopyFrom(batch)
            g.output.append(vi)
    onnx.checker.check_model(out)
    return out
