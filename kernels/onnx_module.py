"""An fp32 ONNX CNN classifier as an eval-mode torch module, so the layer-graph engines can run it.

The incremental occlusion engine (:mod:`.incremental_graph`) and its approximate mode (:mod:`.approx`) plan over
the IR of :mod:`.graph`, which ``build_graph`` makes from a torch module with ``torch.fx``. An ONNX file has no
torch module, so without this translation it could only run the dense engine (every occluded copy through
onnxruntime). :func:`onnx_module` rewrites the graph's ops as the ``torch.nn.functional`` / ``torch`` calls the
IR builder reads (``F.conv2d`` with constant weights, ``F.max_pool2d`` / ``F.avg_pool2d``, ``nn.BatchNorm2d`` --
the IR folds it into the conv before it and refuses a functional batch norm --, unary activations, position-wise
``operator`` ops, ``torch.cat`` on channels, and the dense tail: ``torch.flatten``, ``F.linear``, ``torch.mean``,
...). Its ``forward`` loops over a static list of steps, which ``torch.fx.symbolic_trace`` unrolls into one
straight-line graph; every weight is a buffer (or a BN submodule's state), so ``.to(device)`` moves it.

Supported (default domain, float32 weights): Conv (2-D: group, dilations, strides, symmetric pads, and the
stride-1 "same" padding whose extra pixel is at the bottom/right; auto_pad NOTSET, VALID or SAME_UPPER at stride
1), BatchNormalization (inference), Relu, Clip (relu / relu6 / hardtanh / clamp with constant bounds, attributes
before opset 11), Sigmoid, Tanh, LeakyRelu, Elu, PRelu (constant slope), HardSigmoid, HardSwish, Gelu, Softplus,
Softsign, Abs, Neg, Exp, Log, Sqrt, Erf, Add / Sub / Mul / Div / Pow / Max / Min / Sum (two maps of one shape,
or a map and a constant), MaxPool (symmetric pads, no Indices output), AveragePool (count_include_pad),
GlobalAveragePool, GlobalMaxPool, ReduceMean / ReduceMax / ReduceSum with constant axes, Flatten (axis 1),
Reshape that keeps the batch axis (constant shape, or ``[Shape(x)[0], ...]`` built by Shape / Gather / Unsqueeze /
Concat, as the legacy exporter writes ``x.view(x.size(0), -1)`` with a dynamic batch), Squeeze, Gemm (alpha, beta,
transA, transB), MatMul with a constant right side, Concat, Identity, Dropout, Cast to float, Softmax and
LogSoftmax. The graph's batch may be fixed (1 say): the module takes any batch.

Anything else raises :class:`~.graph.UnsupportedOp` naming the op and its node, as the IR does, so a caller falls
back to the dense engine or refuses in one line. A quantized graph (QuantizeLinear / DequantizeLinear, QLinear*,
integer ops) is refused too: the int8 engine (:mod:`.incremental_int8`) runs those on onnxruntime's own int8
convolutions, which a float translation would not reproduce.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .graph import UnsupportedOp

#: ops of quantized graphs (the same set as ``cifarbench.formats.QUANT_OPS``, repeated here: kernels must not
#: import the cifarbench package)
_QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                        "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul",
                        "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid",
                        "QLinearLeakyRelu", "QLinearSoftmax", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
#: ops that are one torch function of one tensor, or of two (numpy broadcasting in both)
_UNARY = {"Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Softsign": F.softsign, "Abs": torch.abs,
          "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt, "Erf": torch.erf,
          "Softplus": F.softplus, "HardSwish": F.hardswish}
# operator functions, not torch.sub: a constant on the left (1 - x) traces as operator.sub(1.0, x)
_BINARY = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv,
           "Pow": operator.pow}
_REDUCE = {"ReduceMean": torch.mean, "ReduceMax": torch.amax, "ReduceSum": torch.sum}


def onnx_module(proto, size: int | None = None) -> nn.Module:
    """An eval-mode module computing ``proto``'s first output from its image input, for any batch.

    ``proto``: an ``onnx.ModelProto`` of an fp32 CNN classifier whose single input is ``[N, 3, S, S]`` float
    (``N`` fixed or symbolic; ``S`` fixed, or symbolic with ``size`` the side it runs at). Raises :class:`~.graph.UnsupportedOp` for an op (or an attribute of one) it does
    not translate, and for a quantized or non-float32 graph."""
    import onnx  # heavy and optional: only callers that hold an ONNX graph pay for it

    return _Translator(proto, onnx, size).build()


# ---------------------------------------------------------------------------------------------- the module


@dataclass
class _Step:
    """One op: ``fn(module, *args)`` where ``args`` are values named by ``refs`` (a graph value, else a buffer)."""

    fn: object
    refs: tuple[str, ...]
    out: str


class OnnxModule(nn.Module):
    """The translated graph: its constants are buffers (``_buffer_of`` maps a graph value to one), its batch
    norms submodules, and ``forward`` runs the steps in the graph's order."""

    def __init__(self, input_name: str, output_name: str):
        super().__init__()
        self.input_name, self.output_name = input_name, output_name
        self.steps: list[_Step] = []
        self._buffer_of: dict[str, str] = {}

    def forward(self, x):
        env = {self.input_name: x}
        for step in self.steps:
            args = [env[r] if r in env else getattr(self, self._buffer_of[r]) for r in step.refs]
            env[step.out] = step.fn(self, *args)
        return env[self.output_name]


class _Batch:
    """The batch size inside a shape vector (``Shape(x)[0]``): known only when the module runs."""

    def __repr__(self):
        return "N"


_N = _Batch()


class _Translator:
    def __init__(self, proto, onnx, size: int | None = None):
        self.proto, self.onnx = proto, onnx
        graph = proto.graph
        for node in graph.node:  # first: a quantized graph is named as such, not by its int8 tensors
            if node.op_type in _QUANT_OPS:
                raise UnsupportedOp(node.op_type, node.name or node.output[0],
                                    "makes this a quantized graph: it runs on the int8 engine "
                                    "(kernels/incremental_int8.py), not the fp32 graph engine")
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        inits = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        if len(inputs) != 1:
            raise ValueError(f"the graph has {len(inputs)} inputs; occlusion needs exactly one image input")
        self.input = inputs[0]
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in self.input.type.tensor_type.shape.dim]
        if len(dims) == 4 and dims[2] is None and dims[3] is None and size is not None:
            dims[2] = dims[3] = int(size)  # a graph of any size, run at the source's side
        if len(dims) != 4 or dims[2] is None or dims[3] is None:
            raise ValueError(f"the graph's input is {dims}; occlusion needs [N, 3, S, S] with a fixed S")
        self.fixed_batch = dims[0]
        self.module = OnnxModule(self.input.name, graph.output[0].name)
        # every value: a torch tensor (probe activation of a graph value, or a constant), or a shape vector
        self.consts: dict[str, object] = {}
        self.probe: dict[str, torch.Tensor] = {
            self.input.name: torch.zeros(self.fixed_batch or 1, dims[1] or 3, dims[2], dims[3])}
        for t in graph.initializer:
            self.consts[t.name] = self._tensor(t, t.name)

    # ---------------------------------------------------------------- values

    def _tensor(self, t, where: str) -> torch.Tensor:
        onnx = self.onnx
        if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE):
            name = onnx.TensorProto.DataType.Name(t.data_type).lower()
            raise UnsupportedOp(f"{name} tensor", where, "is not float32; the graph engine runs fp32 graphs")
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            raise UnsupportedOp("int8 tensor", where, "makes this a quantized graph, which runs on the int8 engine")
        array = onnx.numpy_helper.to_array(t)
        if array.dtype.kind == "f":
            return torch.from_numpy(np.array(array, dtype=np.float32))
        return torch.from_numpy(np.array(array, dtype=np.int64))

    def _is_const(self, name: str) -> bool:
        return name == "" or name in self.consts

    def _const(self, node, i: int, what: str):
        """Input ``i`` of ``node`` as a constant tensor (None where the input is absent)."""
        if i >= len(node.input) or node.input[i] == "":
            return None
        name = node.input[i]
        if name not in self.consts:
            raise UnsupportedOp(node.op_type, node.name or name, f"takes its {what} from the data")
        return self.consts[name]

    def _ints(self, node, i: int, what: str) -> list[int] | None:
        value = self._const(node, i, what)
        if value is None:
            return None
        if not isinstance(value, torch.Tensor):
            raise UnsupportedOp(node.op_type, node.name, f"takes its {what} from the graph's shapes")
        return [int(v) for v in value.reshape(-1).tolist()]

    def _scalar(self, node, i: int, what: str) -> float | None:
        value = self._const(node, i, what)
        if value is None:
            return None
        if value.numel() != 1:
            raise UnsupportedOp(node.op_type, node.name, f"has a {what} of {value.numel()} values")
        return float(value.reshape(-1)[0])

    def _buffer(self, name: str) -> str:
        """``name`` (a constant) registered as a buffer of the module, once; returns the name to refer to it."""
        if name not in self.module._buffer_of:
            buf = f"c{len(self.module._buffer_of)}"
            self.module.register_buffer(buf, self.consts[name].clone())
            self.module._buffer_of[name] = buf
        return name

    # ---------------------------------------------------------------- building

    def build(self) -> OnnxModule:
        graph = self.proto.graph
        nodes = list(graph.node)
        needed = self._needed(nodes)
        for node in nodes:
            if any(o in needed for o in node.output):
                self._node(node)
        out = graph.output[0].name
        if out in self.consts:
            raise ValueError("the model's output does not depend on its input")
        if out == self.input.name:
            raise ValueError("the model's output is its input")
        logits = self.probe[out]
        if logits.ndim != 2:
            raise UnsupportedOp("output", out, f"is {list(logits.shape)}, not logits [N, classes]")
        return self.module.eval()

    def _needed(self, nodes) -> set[str]:
        """Values the first output depends on: an unused Dropout mask or a dead branch is never translated."""
        needed = {self.proto.graph.output[0].name}
        for node in reversed(nodes):
            if any(o in needed for o in node.output):
                needed.update(i for i in node.input if i)
        return needed

    def _node(self, node) -> None:
        op, name = node.op_type, node.name or node.output[0]
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOp(f"{node.domain}.{op}", name, "is not a standard ONNX op")
        if op == "Constant":
            self._constant(node)
            return
        used = [o for o in node.output[1:] if o]
        if used and op != "Dropout" and op != "BatchNormalization":
            raise UnsupportedOp(op, name, "has more than one output")
        if op in _UNARY:
            self._unary(node, _UNARY[op])
            return
        if op in _BINARY:
            self._binary(node, _BINARY[op], node.input[0], node.input[1])
            return
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise UnsupportedOp(op, name, "is not supported by the ONNX-to-torch translation")
        handler(node, name)

    def _constant(self, node) -> None:
        onnx = self.onnx
        attr = node.attribute[0]
        if attr.name == "value":
            self.consts[node.output[0]] = self._tensor(attr.t, node.name or node.output[0])
        elif attr.name in ("value_float", "value_floats"):
            self.consts[node.output[0]] = torch.tensor(onnx.helper.get_attribute_value(attr), dtype=torch.float32)
        elif attr.name in ("value_int", "value_ints"):
            self.consts[node.output[0]] = torch.tensor(onnx.helper.get_attribute_value(attr), dtype=torch.int64)
        else:
            raise UnsupportedOp("Constant", node.name or node.output[0], f"holds a {attr.name}")

    def _attrs(self, node) -> dict:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    def _emit(self, node, fn, refs, out: str | None = None) -> None:
        """Add the step ``fn(module, *values of refs)``. With only constant inputs it is evaluated now (a
        constant, as a weight transposed in the graph); else it runs on the probe batch, which checks it and
        gives the shapes later ops need (a BN's rank, a Reshape's dims)."""
        out = out or node.output[0]
        refs = tuple(refs)
        folded = all(self._is_const(r) for r in refs)
        if not folded:
            refs = tuple(r if r in self.probe else self._buffer(r) for r in refs)
        args = [self.probe[r] if r in self.probe else self.consts[r] for r in refs]
        try:
            with torch.no_grad():
                value = fn(self.module, *args)
        except Exception as exc:  # a shape or attribute torch does not take: this op is not translatable
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise UnsupportedOp(node.op_type, node.name or out,
                                f"could not be translated ({type(exc).__name__}: {first})") from None
        if folded:
            self.consts[out] = value
            return
        self.probe[out] = value
        self.module.steps.append(_Step(fn, refs, out))

    def _alias(self, node, src: str) -> None:
        """The output is the input (Identity, Dropout, Cast to float): a step that returns its argument, which
        the trace records as nothing."""
        out = node.output[0]
        if src in self.consts:
            self.consts[out] = self.consts[src]
            return
        self.probe[out] = self.probe[src]
        self.module.steps.append(_Step(_identity, (src,), out))

    def _data(self, node, i: int = 0) -> str:
        """Input ``i``, which must be an image-derived tensor or a constant tensor (not a shape vector)."""
        name = node.input[i]
        if isinstance(self.consts.get(name), list):
            raise UnsupportedOp(node.op_type, node.name, "computes on the graph's shapes")
        return name

    # ---------------------------------------------------------------- spatial ops

    def _op_Conv(self, node, name) -> None:
        a = self._attrs(node)
        w = self._const(node, 1, "weight")
        if w.ndim != 4:
            raise UnsupportedOp("Conv", name, f"is a {w.ndim - 2}-d convolution (only 2-d is supported)")
        b = self._const(node, 2, "bias")
        if b is None:
            b = torch.zeros(w.shape[0])
        k = list(a.get("kernel_shape", w.shape[2:]))
        s, d = _pair(a.get("strides", [1, 1]), node), _pair(a.get("dilations", [1, 1]), node)
        padding = self._padding(a, k, s, d, "Conv", name, same_ok=True)
        groups = int(a.get("group", 1))
        wname, bname = f"{node.output[0]}::weight", f"{node.output[0]}::bias"
        self.consts[wname], self.consts[bname] = w, b

        def conv(m, x, w, b, _s=s, _p=padding, _d=d, _g=groups):
            return F.conv2d(x, w, b, _s, _p, _d, _g)

        self._emit(node, conv, [self._data(node), wname, bname])

    def _padding(self, a: dict, k, s, d, op: str, name: str, same_ok: bool):
        """Torch's padding for ONNX ``pads`` / ``auto_pad``: symmetric pads as ``(ph, pw)``; for a conv, also
        the stride-1 "same" padding with the odd pixel at the bottom/right, which torch writes ``"same"``."""
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto == "VALID":
            return (0, 0)
        total = [d[i] * (k[i] - 1) for i in range(2)]
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            if s != (1, 1) or (auto == "SAME_LOWER" and any(t % 2 for t in total)):
                raise UnsupportedOp(op, name, f"has auto_pad={auto} at stride {list(s)} (asymmetric padding)")
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
        elif auto == "NOTSET":
            pads = list(a.get("pads", [0, 0, 0, 0]))
        else:
            raise UnsupportedOp(op, name, f"has auto_pad={auto}")
        if len(pads) != 4:
            raise UnsupportedOp(op, name, f"has {len(pads)} pads (only 2-d is supported)")
        top, left, bottom, right = pads
        if (top, left) == (bottom, right):
            return (top, left)
        if same_ok and s == (1, 1) and [top, left] == [t // 2 for t in total] and \
                [bottom, right] == [t - t // 2 for t in total]:
            return "same"
        raise UnsupportedOp(op, name, f"has asymmetric pads {pads}")

    def _op_MaxPool(self, node, name) -> None:
        a = self._attrs(node)
        if any(node.output[1:]):
            raise UnsupportedOp("MaxPool", name, "returns indices")
        if a.get("storage_order", 0):
            raise UnsupportedOp("MaxPool", name, "has storage_order=1")
        k, s = _pair(a["kernel_shape"], node), _pair(a.get("strides", [1, 1]), node)
        d = _pair(a.get("dilations", [1, 1]), node)
        p = self._padding(a, k, s, d, "MaxPool", name, same_ok=False)
        ceil = bool(a.get("ceil_mode", 0))

        def max_pool(m, x, _k=k, _s=s, _p=p, _d=d, _c=ceil):
            return F.max_pool2d(x, _k, _s, _p, _d, _c)

        self._emit(node, max_pool, [self._data(node)])

    def _op_AveragePool(self, node, name) -> None:
        a = self._attrs(node)
        k, s = _pair(a["kernel_shape"], node), _pair(a.get("strides", [1, 1]), node)
        if _pair(a.get("dilations", [1, 1]), node) != (1, 1):
            raise UnsupportedOp("AveragePool", name, "is dilated")
        p = self._padding(a, k, s, (1, 1), "AveragePool", name, same_ok=False)
        ceil, include = bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0))

        def avg_pool(m, x, _k=k, _s=s, _p=p, _c=ceil, _i=include):
            return F.avg_pool2d(x, _k, _s, _p, _c, _i)

        self._emit(node, avg_pool, [self._data(node)])

    def _op_BatchNormalization(self, node, name) -> None:
        a = self._attrs(node)
        if a.get("training_mode", 0) or any(node.output[1:]):
            raise UnsupportedOp("BatchNormalization", name, "is in training mode")
        scale, bias, mean, var = (self._const(node, i, what) for i, what in
                                  enumerate(("scale", "bias", "mean", "variance"), 1))
        eps = float(a.get("epsilon", 1e-5))
        x = self._data(node)
        rank = self.probe[x].ndim if x in self.probe else self.consts[x].ndim
        if rank == 4:
            # a module, not F.batch_norm: the IR reads nn.BatchNorm2d (and folds it into the conv before it)
            bn = nn.BatchNorm2d(len(mean), eps=eps).eval()
            with torch.no_grad():
                bn.weight.copy_(scale)
                bn.bias.copy_(bias)
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
            bn.requires_grad_(False)
            sub = f"bn{sum(1 for _ in self.module.children())}"
            self.module.add_module(sub, bn)

            def batch_norm(m, x, _sub=sub):
                return getattr(m, _sub)(x)

            self._emit(node, batch_norm, [x])
            return
        # any other rank (a BN on the pooled features): the same affine map, per channel on axis 1
        shape = (-1,) + (1,) * (rank - 2)
        factor = scale / torch.sqrt(var + eps)
        sname, tname = f"{node.output[0]}::scale", f"{node.output[0]}::shift"
        self.consts[sname] = factor.reshape(shape)
        self.consts[tname] = (bias - mean * factor).reshape(shape)
        self._emit(node, _affine, [x, sname, tname])

    # ---------------------------------------------------------------- position-wise ops

    def _unary(self, node, fn) -> None:
        def unary(m, x, _f=fn):
            return _f(x)

        self._emit(node, unary, [self._data(node)])

    def _with(self, node, fn, **kw) -> None:
        """A unary function with constant keyword arguments (an activation's attributes)."""
        def call(m, x, _f=fn, _kw=kw):
            return _f(x, **_kw)

        self._emit(node, call, [self._data(node)])

    def _op_LeakyRelu(self, node, name):
        self._with(node, F.leaky_relu, negative_slope=float(self._attrs(node).get("alpha", 0.01)))

    def _op_Elu(self, node, name):
        self._with(node, F.elu, alpha=float(self._attrs(node).get("alpha", 1.0)))

    def _op_Gelu(self, node, name):
        approx = self._attrs(node).get("approximate", b"none")
        self._with(node, F.gelu, approximate=approx.decode() if isinstance(approx, bytes) else approx)

    def _op_HardSigmoid(self, node, name):
        a = self._attrs(node)
        alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
        if math.isclose(alpha, 1 / 6, rel_tol=1e-6) and beta == 0.5:
            self._unary(node, F.hardsigmoid)  # torch's own: relu6(x + 3) / 6
        else:
            self._with(node, _hard_sigmoid, alpha=alpha, beta=beta)

    def _op_PRelu(self, node, name):
        slope, x = self._const(node, 1, "slope"), self._data(node)
        rank = self.probe[x].ndim if x in self.probe else self.consts[x].ndim
        # ONNX broadcasts the slope from the right: only one value, or one per channel (axis 1), is per-channel
        shape = [1] * (rank - slope.ndim) + list(slope.shape)
        if slope.numel() != 1 and (len(shape) != rank or any(v != 1 for i, v in enumerate(shape) if i != 1)):
            raise UnsupportedOp("PRelu", name, f"has a slope of shape {list(slope.shape)} that is not per channel")
        sname = f"{node.output[0]}::slope"
        self.consts[sname] = slope.reshape(-1)

        def prelu(m, x, w):
            return F.prelu(x, w)

        self._emit(node, prelu, [x, sname])

    def _op_Clip(self, node, name):
        if self.opset < 11:
            a = self._attrs(node)
            lo, hi = a.get("min"), a.get("max")
        else:
            lo, hi = self._scalar(node, 1, "min"), self._scalar(node, 2, "max")
        if lo is None and hi is None:
            self._alias(node, self._data(node))
        elif lo == 0 and hi is None:
            self._unary(node, F.relu)
        elif lo == 0 and hi == 6:
            self._unary(node, F.relu6)
        elif lo is not None and hi is not None:
            self._with(node, F.hardtanh, min_val=float(lo), max_val=float(hi))
        else:
            self._with(node, torch.clamp, min=lo, max=hi)

    def _binary(self, node, fn, a: str, b: str) -> None:
        refs = []
        for r in (a, b):
            if isinstance(self.consts.get(r), list):
                raise UnsupportedOp(node.op_type, node.name, "computes on the graph's shapes")
            refs.append(r)
        # a one-value constant is a Python number in the trace: x * 0.5, not x * a buffer
        scalars = {i: float(self.consts[r].reshape(-1)[0]) for i, r in enumerate(refs)
                   if r in self.consts and self.consts[r].numel() == 1 and self.consts[r].is_floating_point()
                   and self.consts[r].ndim <= 1 and not all(self._is_const(x) for x in refs)}
        if 0 in scalars:
            def call(m, y, _f=fn, _c=scalars[0]):
                return _f(_c, y)

            self._emit(node, call, [refs[1]])
        elif 1 in scalars:
            def call(m, x, _f=fn, _c=scalars[1]):
                return _f(x, _c)

            self._emit(node, call, [refs[0]])
        else:
            def call(m, x, y, _f=fn):
                return _f(x, y)

            self._emit(node, call, refs)

    def _op_Max(self, node, name):
        self._variadic(node, torch.maximum)

    def _op_Min(self, node, name):
        self._variadic(node, torch.minimum)

    def _op_Sum(self, node, name):
        self._variadic(node, operator.add)

    def _variadic(self, node, fn) -> None:
        """Sum / Max / Min of any number of inputs, as a chain of binary ops."""
        inputs = list(node.input)
        if len(inputs) == 1:
            self._alias(node, self._data(node))
            return
        acc = inputs[0]
        for i, other in enumerate(inputs[1:], 1):
            out = node.output[0] if i == len(inputs) - 1 else f"{node.output[0]}::{i}"
            self._binary(_Renamed(node, out), fn, acc, other)
            acc = out

    def _op_Identity(self, node, name):
        self._alias(node, node.input[0])

    def _op_Dropout(self, node, name):
        if len(node.output) > 1 and node.output[1]:
            raise UnsupportedOp("Dropout", name, "has its mask used")
        if len(node.input) > 2 and node.input[2] and self._const(node, 2, "training_mode").item():
            raise UnsupportedOp("Dropout", name, "is in training mode")
        self._alias(node, self._data(node))

    def _op_Cast(self, node, name):
        src, to = node.input[0], self._attrs(node).get("to")
        value = self.consts.get(src)
        shapes = isinstance(value, list) or (isinstance(value, torch.Tensor) and not value.is_floating_point())
        if shapes and to in (self.onnx.TensorProto.INT64, self.onnx.TensorProto.INT32):
            self._alias(node, src)  # shape arithmetic in int32 or int64: the values are the same
        elif to == self.onnx.TensorProto.FLOAT and not shapes:
            self._alias(node, src)
        else:
            raise UnsupportedOp("Cast", name, f"casts to {self.onnx.TensorProto.DataType.Name(to).lower()}")

    # ---------------------------------------------------------------- channels and the tail

    def _op_Concat(self, node, name):
        axis = int(self._attrs(node)["axis"])
        if any(isinstance(self.consts.get(i), list) for i in node.input):
            self._shape_concat(node)
            return

        def cat(m, *xs, _axis=axis):
            return torch.cat(xs, _axis)

        self._emit(node, cat, list(node.input))

    def _op_GlobalAveragePool(self, node, name):
        self._with(node, torch.mean, dim=(2, 3), keepdim=True)

    def _op_GlobalMaxPool(self, node, name):
        self._with(node, torch.amax, dim=(2, 3), keepdim=True)

    def _reduce(self, node, name):
        a = self._attrs(node)
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self._ints(node, 1, "axes")
        if not axes:
            raise UnsupportedOp(node.op_type, name, "reduces over every axis")
        x = self._data(node)
        if 0 in axes or -self.probe.get(x, torch.zeros(4)).ndim in axes:
            raise UnsupportedOp(node.op_type, name, "reduces over the batch")
        self._with(node, _REDUCE[node.op_type], dim=tuple(int(v) for v in axes),
                   keepdim=bool(a.get("keepdims", 1)))

    _op_ReduceMean = _op_ReduceMax = _op_ReduceSum = _reduce

    def _op_Flatten(self, node, name):
        if int(self._attrs(node).get("axis", 1)) != 1:
            raise UnsupportedOp("Flatten", name, f"flattens from axis {self._attrs(node).get('axis')}, not 1")
        self._with(node, torch.flatten, start_dim=1)

    def _op_Reshape(self, node, name):
        x = self._data(node)
        target = self.consts.get(node.input[1])
        if target is None:
            raise UnsupportedOp("Reshape", name, "takes its shape from the data")
        dims = target if isinstance(target, list) else [int(v) for v in target.reshape(-1).tolist()]
        if self._attrs(node).get("allowzero", 0) and 0 in dims:
            raise UnsupportedOp("Reshape", name, "has allowzero with a zero in its shape")
        if x in self.consts:  # a constant reshaped: evaluated now
            self.consts[node.output[0]] = self.consts[x].reshape(
                [self.consts[x].shape[i] if v == 0 else v for i, v in enumerate(dims)])
            return
        shape = list(self.probe[x].shape)
        first = dims[0] if dims else None
        # the module takes any batch: the first axis must be the batch, kept (N, 0, -1 with the rest fixed, or
        # the graph's own fixed batch)
        rest = [shape[i] if v == 0 else v for i, v in enumerate(dims[1:], 1)]
        known = math.prod(v for v in rest if v != -1)
        per_image = math.prod(shape[1:])
        keeps = first is _N or first == 0 or (first == -1 and -1 not in rest and known == per_image) or \
            (isinstance(first, int) and first > 0 and first == self.fixed_batch and first == shape[0])
        if not keeps or any(v is _N for v in rest):
            raise UnsupportedOp("Reshape", name, f"reshapes to {dims}, which does not keep the batch axis")
        if rest in ([per_image], [-1]) and len(shape) >= 2:
            self._with(node, torch.flatten, start_dim=1)
            return

        def reshape(m, x, _rest=tuple(rest)):
            return torch.reshape(x, (x.size(0),) + _rest)

        self._emit(node, reshape, [x])

    def _op_Squeeze(self, node, name):
        axes = self._attrs(node).get("axes") if self.opset < 13 else self._ints(node, 1, "axes")
        if axes is None:
            x = self._data(node)
            axes = [i for i, v in enumerate(self.probe[x].shape) if v == 1 and i > 0] if x in self.probe else None
            if axes is None:
                raise UnsupportedOp("Squeeze", name, "squeezes a constant without axes")
        if 0 in axes:
            raise UnsupportedOp("Squeeze", name, "squeezes the batch axis")
        self._with(node, torch.squeeze, dim=tuple(int(v) for v in axes))

    def _op_Gemm(self, node, name):
        a = self._attrs(node)
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        b = self._const(node, 1, "weight")
        weight = (b if a.get("transB", 0) else b.t()) * alpha  # F.linear's [out, in]
        c = self._const(node, 2, "bias")
        bias = None
        if c is not None:
            if c.numel() not in (1, weight.shape[0]) or (c.ndim == 2 and c.shape[0] != 1):
                raise UnsupportedOp("Gemm", name, f"has a bias of shape {list(c.shape)}")
            bias = (c.reshape(-1) * beta).expand(weight.shape[0]).contiguous()
        wname = f"{node.output[0]}::weight"
        self.consts[wname] = weight.contiguous()
        refs = [self._data(node), wname]
        if bias is not None:
            self.consts[f"{node.output[0]}::bias"] = bias
            refs.append(f"{node.output[0]}::bias")
        trans_a = bool(a.get("transA", 0))

        def gemm(m, x, w, b=None, _t=trans_a):
            return F.linear(x.t() if _t else x, w, b)

        self._emit(node, gemm, refs)

    def _op_MatMul(self, node, name):
        b = self._const(node, 1, "right side")
        if b.ndim != 2:
            raise UnsupportedOp("MatMul", name, f"has a {b.ndim}-d right side")
        wname = f"{node.output[0]}::weight"
        self.consts[wname] = b.t().contiguous()

        def matmul(m, x, w):
            return F.linear(x, w)

        self._emit(node, matmul, [self._data(node), wname])

    def _op_Softmax(self, node, name):
        self._softmax(node, name, torch.softmax)

    def _op_LogSoftmax(self, node, name):
        self._softmax(node, name, F.log_softmax)

    def _softmax(self, node, name, fn):
        x = self._data(node)
        rank = self.probe[x].ndim if x in self.probe else 2
        axis = int(self._attrs(node).get("axis", -1 if self.opset >= 13 else 1))
        if self.opset < 13 and axis % rank != rank - 1:
            raise UnsupportedOp(node.op_type, name, "normalizes over several axes (opset < 13)")
        if axis % rank == 0:
            raise UnsupportedOp(node.op_type, name, "normalizes over the batch")
        self._with(node, fn, dim=axis)

    # ---------------------------------------------------------------- shape arithmetic

    def _op_Shape(self, node, name):
        """``Shape(x)``: a vector whose first entry is the batch (:data:`_N`); the others are fixed (the input
        side is), read from the probe. Only Gather / Unsqueeze / Concat / Squeeze may use it, for a Reshape."""
        x = node.input[0]
        if x not in self.probe:
            raise UnsupportedOp("Shape", name, "reads a constant's shape")
        a = self._attrs(node)
        shape = [_N] + list(self.probe[x].shape[1:])
        self.consts[node.output[0]] = shape[a.get("start", 0):a.get("end", len(shape))]

    def _op_Gather(self, node, name):
        vector = self.consts.get(node.input[0])
        if not isinstance(vector, list):
            raise UnsupportedOp("Gather", name, "gathers from a tensor (only from a Shape is supported)")
        idx = self._const(node, 1, "indices")
        picked = [vector[int(i)] for i in idx.reshape(-1).tolist()]
        self.consts[node.output[0]] = picked  # a 0-d index gives one entry; Unsqueeze / Concat keep it a list

    def _op_Unsqueeze(self, node, name):
        value = self.consts.get(node.input[0])
        if isinstance(value, list):  # a Shape entry made a 1-d vector: it already is a list
            self.consts[node.output[0]] = value
            return
        axes = self._attrs(node).get("axes") if self.opset < 13 else self._ints(node, 1, "axes")
        if not axes:
            raise UnsupportedOp("Unsqueeze", name, "has no axes")
        x = self._data(node)
        rank = (self.probe[x] if x in self.probe else self.consts[x]).ndim + len(axes)
        axes = sorted(int(v) % rank for v in axes)
        if x in self.probe and 0 in axes:
            raise UnsupportedOp("Unsqueeze", name, "adds an axis before the batch")

        def unsqueeze(m, x, _axes=tuple(axes)):
            for axis in _axes:  # ascending: each axis is where it lands in the output
                x = torch.unsqueeze(x, axis)
            return x

        self._emit(node, unsqueeze, [x])

    def _shape_concat(self, node) -> None:
        out = []
        for i in node.input:
            value = self.consts.get(i)
            if isinstance(value, list):
                out.extend(value)
            elif isinstance(value, torch.Tensor) and not value.is_floating_point():
                out.extend(int(v) for v in value.reshape(-1).tolist())
            else:
                raise UnsupportedOp("Concat", node.name, "concatenates a shape with the data")
        self.consts[node.output[0]] = out


class _Renamed:
    """``node`` with another output name (one link of a variadic Sum / Max / Min chain)."""

    def __init__(self, node, out: str):
        self.op_type, self.name, self.input, self.output = node.op_type, node.name, node.input, [out]


def _pair(v, node) -> tuple[int, int]:
    v = list(v)
    if len(v) != 2:
        raise UnsupportedOp(node.op_type, node.name or node.output[0], f"is {len(v)}-d (only 2-d is supported)")
    return int(v[0]), int(v[1])


def _identity(m, x):
    return x


def _affine(m, x, scale, shift):
    return x * scale + shift


def _hard_sigmoid(x, alpha: float, beta: float):
    return torch.clamp(x * alpha + beta, 0.0, 1.0)
