"""A small layer-graph IR of a CNN's spatial part, built from any torch module with ``torch.fx``.

The incremental occlusion engine (:mod:`cifarbench.kernels.incremental_graph`) needs, per layer, only how its
output positions read its input positions (kernel, stride, padding, dilation per axis) and how to compute a
window of it. So the IR has a handful of node kinds:

* ``input``: the [0, 1] image.
* ``conv``: any kernel / stride / padding (asymmetric too) / dilation / groups, with BN folded in when the BN is
  the conv's only user.
* ``maxpool`` / ``avgpool``: kernel, stride, padding, dilation (max), ``ceil_mode``, ``count_include_pad``.
* ``binary``: a position-wise op of two spatial tensors of one shape (residual add, multiply, ...).
* ``concat``: channel concatenation.
* ``pointwise``: any function applied value by value, with per-channel constants at most (activations, BN that
  could not be folded, the model's own ``(x - m) / s`` normalization, dropout and identity in eval mode).

Every node also carries ``post``: pointwise functions fused into it (a ReLU after a conv, a normalization after
the input) when the node is their only producer and they its only user, so the engine writes the activated
window once instead of gathering it again.

Everything from the first op that mixes all positions (flatten, view, global or adaptive pooling, a reduction,
linear) on is the **dense tail**, kept as an ``fx.GraphModule`` whose inputs are the spatial nodes it reads
(the frontier). An op the IR cannot represent in the spatial part (a roll, an interpolation, a spatial mask, a
squeeze-excitation product of a spatial map and a pooled value, ...) raises :class:`UnsupportedOp` naming it.
"""
from __future__ import annotations

import copy
import itertools
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn


class UnsupportedOp(ValueError):
    """The graph has an op in its spatial part the IR cannot represent; ``op`` names it."""

    def __init__(self, op: str, node: str, why: str = ""):
        self.op, self.node = op, node
        super().__init__(f"op {op} (node {node}) {why or 'is not supported in the spatial part'}")


@dataclass(frozen=True)
class Axis:
    """How output position ``o`` reads input positions ``o * s - p + j * d`` for ``j`` in ``[0, k)``."""

    k: int = 1
    s: int = 1
    p: int = 0
    d: int = 1

    @property
    def span(self) -> int:
        return (self.k - 1) * self.d + 1


@dataclass
class Node:
    """One spatial node. ``inputs`` index earlier nodes; ``shape`` is ``(C, H, W)`` of its output."""

    name: str
    kind: str
    inputs: tuple[int, ...] = ()
    shape: tuple[int, int, int] = (0, 0, 0)
    axes: tuple[Axis, Axis] = (Axis(), Axis())
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    groups: int = 1
    fn: Callable | None = None  # pointwise (one tensor) or binary (two tensors)
    pool: dict = field(default_factory=dict)  # ceil_mode, count_include_pad, divisor_override
    post: list = field(default_factory=list)  # fused pointwise functions, applied in order
    post_names: list = field(default_factory=list)
    fn_name: str = ""  # what a pointwise node computes, for describe()
    bn: tuple | None = None  # (scale, shift) of a BN, folded into its conv when the conv has no other user

    def describe(self) -> str:
        extra = "+".join(self.post_names)
        return f"{self.name}:{self.kind}" + (f"+{extra}" if extra else "")


@dataclass
class Graph:
    """Spatial nodes in topological order (node 0 is the input), the frontier the dense tail reads, and the
    tail. ``size`` is the input side the shapes were computed for."""

    nodes: list[Node]
    frontier: tuple[int, ...]
    tail: fx.GraphModule
    size: tuple[int, int]

    def pad_value(self, v: int) -> float:
        """What padding reads as for node ``v``'s input: -inf for max pooling, zero otherwise."""
        return float("-inf") if self.nodes[v].kind == "maxpool" else 0.0

    # ------------------------------------------------------------------ dense evaluation

    def run_node(self, v: int, xs: list[torch.Tensor]) -> torch.Tensor:
        """Node ``v`` on whole NCHW maps ``xs`` (its inputs), fused ``post`` included."""
        node = self.nodes[v]
        y = apply_op(node, xs, whole=True)
        for f in node.post:
            y = f(y)
        return y

    def run(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every spatial node's activation and the tail's output, for a batch ``x`` in [0, 1]."""
        acts: list[torch.Tensor] = []
        for v, node in enumerate(self.nodes):
            if node.kind == "input":
                y = x
                for f in node.post:
                    y = f(y)
            else:
                y = self.run_node(v, [acts[u] for u in node.inputs])
            acts.append(y)
        return acts, self.tail(*[acts[f] for f in self.frontier])

    def describe(self) -> list[str]:
        return [n.describe() for n in self.nodes]


def apply_op(node: Node, xs: list[torch.Tensor], whole: bool) -> torch.Tensor:
    """The node's op (without ``post``). ``whole``: on whole maps with the node's padding; else on windows the
    caller already padded (padding 0, and no ceil_mode: the window has exactly the rows the outputs read)."""
    (ah, aw) = node.axes
    if node.kind == "conv":
        x = xs[0]
        if whole:
            x = _pad(x, node, 0.0)
        return F.conv2d(x, node.weight, node.bias, (ah.s, aw.s), 0, (ah.d, aw.d), node.groups)
    if node.kind == "maxpool":
        x = _pad(xs[0], node, float("-inf")) if whole else xs[0]
        return F.max_pool2d(x, (ah.k, aw.k), (ah.s, aw.s), 0, (ah.d, aw.d))
    if node.kind == "avgpool":
        if whole:
            return F.avg_pool2d(xs[0], (ah.k, aw.k), (ah.s, aw.s), (ah.p, aw.p), **node.pool)
        return F.avg_pool2d(xs[0], (ah.k, aw.k), (ah.s, aw.s), 0)
    if node.kind == "binary":
        return node.fn(xs[0], xs[1])
    if node.kind == "concat":
        return torch.cat(xs, 1)
    if node.kind == "pointwise":
        return node.fn(xs[0])
    raise AssertionError(node.kind)


def _pad(x: torch.Tensor, node: Node, value: float) -> torch.Tensor:
    """Pad a whole map so that a padding-0 op gives exactly the node's output shape (asymmetric and ceil_mode
    padding included: the right/bottom pad is whatever the output size needs, cropping if negative)."""
    (ah, aw), (_, ho, wo) = node.axes, node.shape
    bottom = (ho - 1) * ah.s + ah.span - ah.p - x.shape[2]
    right = (wo - 1) * aw.s + aw.span - aw.p - x.shape[3]
    if ah.p == aw.p == bottom == right == 0:
        return x
    return F.pad(x, (aw.p, right, ah.p, bottom), value=value)


# ---------------------------------------------------------------------------------------------- building

_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                       nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign,
                       nn.Tanhshrink, nn.PReLU, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)
_TAIL_MODULES = (nn.Flatten, nn.Linear, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Unflatten, nn.Softmax,
                 nn.LogSoftmax)
_UNARY_FUNCTIONS = {F.relu, F.relu6, F.hardtanh, F.silu, F.gelu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid,
                    F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.softsign, F.logsigmoid,
                    F.hardshrink, F.softshrink, F.threshold, F.prelu,
                    torch.relu, torch.sigmoid, torch.tanh, torch.abs, torch.exp, torch.neg, torch.clamp,
                    torch.clip, torch.square, torch.sqrt, torch.rsqrt, torch.log, torch.erf, torch.sin, torch.cos,
                    operator.neg, operator.abs}
_IDENTITY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                       F.feature_alpha_dropout}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
                     torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.pow,
                     torch.true_divide, torch.subtract, torch.multiply}
_INPLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
            operator.itruediv: operator.truediv}
_TAIL_FUNCTIONS = {torch.flatten, F.linear, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.mean, torch.sum,
                   torch.amax, torch.max, torch.reshape, torch.squeeze, torch.softmax, F.softmax,
                   F.log_softmax}
_UNARY_METHODS = {"relu", "sigmoid", "tanh", "abs", "exp", "neg", "clamp", "clip", "clamp_min", "clamp_max",
                  "square", "sqrt", "rsqrt", "log", "erf", "sin", "cos"}
_BINARY_METHODS = {"add", "sub", "mul", "div", "true_divide", "pow", "maximum", "minimum", "subtract",
                   "multiply"}
_IDENTITY_METHODS = {"contiguous", "clone", "float", "detach"}
_TAIL_METHODS = {"flatten", "view", "reshape", "mean", "sum", "amax", "max", "squeeze", "size", "softmax",
                 "log_softmax", "unsqueeze", "permute", "transpose"}


def _name(target) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", None) or repr(target)


def build_graph(module: nn.Module, size: int | tuple[int, int] = 32, channels: int = 3) -> Graph:
    """The IR of ``module`` (eval semantics: BN uses running statistics, dropout is identity) for square or
    ``(H, W)`` inputs of ``size``. Raises :class:`UnsupportedOp` for a spatial op it cannot represent."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return _Builder(functionalize(trace(module)), size, channels).build()


def _mutates(n: fx.Node, modules: dict) -> bool:
    """Whether ``n`` writes into its first argument: ``x.relu_()``, ``x.sub_(m)``, ``torch.relu_(x)``,
    ``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)(x)``, ``x += y``."""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.endswith("__")
    if n.op == "call_function":
        name = getattr(n.target, "__name__", "")
        return n.target in _INPLACE or bool(n.kwargs.get("inplace")) or \
            (name.endswith("_") and not name.endswith("__") and getattr(n.target, "__module__", "") in
             ("torch", "torch._C._VariableFunctions", "torch.nn.functional"))
    if n.op == "call_module":
        return bool(getattr(modules.get(n.target), "inplace", False))
    return False


def functionalize(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose in-place ops are data flow: after ``x.relu_()`` (its result often unused), every
    later reader of ``x`` reads the op's node, as it reads the mutated tensor when the module runs. Without it
    the IR would drop the unused node and compute the model without its in-place ops."""
    modules = dict(gm.named_modules())
    order = list(gm.graph.nodes)
    if not any(_mutates(n, modules) for n in order):
        return gm
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # graph_copy copies every node but the output
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    for i, n in enumerate(nodes):
        if _mutates(n, modules):
            target = n.args[0]
            for user in list(target.users):
                if user is not n and position.get(user, -1) > i:
                    user.replace_input_with(target, n)
    return fx.GraphModule(gm, graph)


def trace(module: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace``, with a module it cannot trace (Python control flow on tensor values, a
    TorchScript module) refused as :class:`UnsupportedOp`."""
    if isinstance(module, fx.GraphModule):
        return module
    if isinstance(module, torch.jit.ScriptModule):
        raise UnsupportedOp("TorchScript module", type(module).__name__, "cannot be traced by torch.fx")
    try:
        return fx.symbolic_trace(module)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError... depending on the construct
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedOp("torch.fx trace", type(module).__name__, f"failed: {first[:200]}") from None


class _Builder:
    def __init__(self, gm: fx.GraphModule, size, channels):
        self.gm, self.size, self.channels = gm, size, channels
        self.modules = dict(gm.named_modules())
        self.nodes: list[Node] = []
        self.index: dict[fx.Node, int] = {}  # fx node -> spatial node index
        self.tail: set[fx.Node] = set()
        self.consts: dict[fx.Node, object] = {}  # nodes that read no image-derived value, evaluated once

    # ---------------------------------------------------------------- shapes

    def _propagate_shapes(self) -> None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            try:
                ShapeProp(self.gm).propagate(torch.zeros(1, self.channels, *self.size,
                                                         device=self._device(), dtype=self._dtype()))
            except Exception as exc:  # the model does not take this input size
                raise ValueError(f"the model does not run on {self.size[0]}x{self.size[1]} inputs "
                                 f"({type(exc).__name__}: {exc})") from None

    def _device(self):
        for t in itertools.chain(self.gm.parameters(), self.gm.buffers()):
            return t.device
        return torch.device("cpu")

    def _dtype(self):
        for t in self.gm.parameters():
            return t.dtype
        return torch.float32

    def _meta_shape(self, n: fx.Node):
        tm = n.meta.get("tensor_meta")
        return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None

    # ---------------------------------------------------------------- helpers

    def _const(self, a):
        """The value of a constant argument (number, get_attr tensor), or raise if it is not a constant."""
        if isinstance(a, fx.Node):
            if a in self.consts:
                return self.consts[a]
            if a.op == "get_attr":
                obj = self.gm
                for part in a.target.split("."):
                    obj = getattr(obj, part)
                return obj.detach() if isinstance(obj, torch.Tensor) else obj
            raise KeyError(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self._const(x) for x in a)
        return a

    def _per_channel(self, value, n: fx.Node, opname: str) -> None:
        """Constants in a pointwise op must not vary with position (a spatial mask would need the position)."""
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and (value.shape[-1] != 1 or value.shape[-2] != 1):
            raise UnsupportedOp(opname, n.name, "combines the map with a constant that varies by position")

    def _spatial_args(self, n: fx.Node) -> list[fx.Node]:
        return [a for a in n.all_input_nodes if not self._is_const(a)]

    def _is_const(self, a) -> bool:
        return isinstance(a, fx.Node) and (a.op == "get_attr" or a in self.consts)

    def _fold(self, n: fx.Node) -> None:
        """A node that reads only constants (``self.scale.view(1, -1, 1, 1)``) is evaluated once: a constant."""
        args = tuple(self._const(a) for a in n.args)
        kwargs = {k: self._const(v) for k, v in n.kwargs.items()}
        with torch.no_grad():
            try:
                self.consts[n] = self._evaluate(n, args, kwargs)
            except Exception as exc:
                raise UnsupportedOp(self._opname(n), n.name, f"could not be evaluated as a constant ({exc})") from None

    def _evaluate(self, n: fx.Node, args, kwargs):
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return self.modules[n.target](*args, **kwargs)

    def _add(self, n: fx.Node, node: Node) -> None:
        shape = self._meta_shape(n)
        node.shape = tuple(int(v) for v in shape[1:])
        self.index[n] = len(self.nodes)
        self.nodes.append(node)

    def _generic_call(self, n: fx.Node, target, opname: str, binary_ok: bool) -> None:
        """A pointwise function of one spatial tensor and constants, or of two spatial tensors."""
        spatial = self._spatial_args(n)
        args = list(n.args)
        kwargs = dict(n.kwargs)
        if "inplace" in kwargs:
            kwargs["inplace"] = False
        consts = {}
        for i, a in enumerate(args):
            if self._is_const(a):
                consts[i] = self._const(a)
                self._per_channel(consts[i], n, opname)
        for key, a in kwargs.items():
            if isinstance(a, fx.Node):
                if not self._is_const(a):
                    raise UnsupportedOp(opname, n.name, "takes a tensor keyword argument")
                kwargs[key] = self._const(a)
                self._per_channel(kwargs[key], n, opname)
        positions = [i for i, a in enumerate(args) if isinstance(a, fx.Node) and not self._is_const(a)]
        for i, a in enumerate(args):
            if isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a):
                raise UnsupportedOp(opname, n.name, "takes a list of tensors")
            if i in consts:
                args[i] = consts[i]
        if len(spatial) == 1 and positions:
            if target in (F.relu, torch.relu, torch.Tensor.relu) and len(args) == 1 and \
                    not any(kwargs.values()):
                self._add(n, Node(n.name, "pointwise", (self.index[spatial[0]],), fn=relu, fn_name="relu"))
                return

            def call(x, _args=tuple(args), _kw=kwargs, _pos=tuple(positions), _t=target):
                a = list(_args)
                for i in _pos:  # x + x: the one map in every tensor slot
                    a[i] = x
                return _t(*a, **_kw)

            self._add(n, Node(n.name, "pointwise", (self.index[spatial[0]],), fn=call))
            self.nodes[-1].fn_name = opname
            return
        if binary_ok and len(spatial) == 2 and len(positions) == 2:
            if self._meta_shape(spatial[0]) != self._meta_shape(spatial[1]):
                raise UnsupportedOp(opname, n.name, "broadcasts two maps of different shapes")
            p0, p1 = positions

            def call2(x, y, _args=tuple(args), _kw=kwargs, _p=(p0, p1), _t=target):
                a = list(_args)
                a[_p[0]], a[_p[1]] = x, y
                return _t(*a, **_kw)

            self._add(n, Node(n.name, "binary", tuple(self.index[s] for s in spatial), fn=call2))
            self.nodes[-1].fn_name = opname
            return
        raise UnsupportedOp(opname, n.name, f"has {len(spatial)} tensor inputs")

    # ---------------------------------------------------------------- main

    def build(self) -> Graph:
        self._propagate_shapes()
        graph = self.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(f"the model takes {len(placeholders)} inputs; occlusion needs exactly one image input")
        output = None
        for n in graph.nodes:
            if n.op == "placeholder":
                self._add(n, Node(n.name, "input"))
            elif n.op == "get_attr":
                continue
            elif n.op == "output":
                output = n
            else:
                self._visit(n)
        frontier = []
        for n in graph.nodes:
            if n in self.tail or n.op == "output":
                for a in n.all_input_nodes:
                    if a in self.index and self.index[a] not in frontier:
                        frontier.append(self.index[a])
        if not frontier:
            raise ValueError("the model's output does not depend on its input")
        self._fuse()
        tail = self._tail_module(output, frontier)
        return Graph(self.nodes, tuple(self._remap[f] for f in frontier), tail, self.size)

    def _visit(self, n: fx.Node) -> None:
        ins = n.all_input_nodes
        if any(a in self.tail for a in ins):
            spatial_in = [a for a in ins if a in self.index]
            shape = self._meta_shape(n)
            if spatial_in and shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1:
                other = next(a for a in ins if a in self.tail)
                raise UnsupportedOp(self._opname(n), n.name,
                                    f"combines a spatial map with {other.name} ({self._opname(other)}), a value "
                                    f"computed by an op the engine does not follow position by position (e.g. a "
                                    f"transpose, or a squeeze-excitation gate pooled over the whole map)")
            self.tail.add(n)
            return
        if not any(a in self.index for a in ins):
            self._fold(n)  # reads no image-derived value: a constant
            return
        opname = self._opname(n)
        shape = self._meta_shape(n)
        if self._is_tail_start(n) or shape is None or len(shape) != 4:
            self.tail.add(n)
            return
        if n.op == "call_module":
            self._module(n, self.modules[n.target], opname)
        elif n.op == "call_function":
            self._function(n, opname)
        elif n.op == "call_method":
            self._method(n, opname)
        else:
            raise UnsupportedOp(opname, n.name)

    def _opname(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return type(self.modules[n.target]).__name__
        if n.op == "call_method":
            return f"Tensor.{n.target}"
        return _name(n.target)

    def _is_tail_start(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            return isinstance(self.modules[n.target], _TAIL_MODULES)
        if n.op == "call_function":
            return n.target in _TAIL_FUNCTIONS or n.target is getattr
        if n.op == "call_method":
            return n.target in _TAIL_METHODS
        return False

    def _module(self, n: fx.Node, m: nn.Module, opname: str) -> None:
        (src,) = self._spatial_args(n) if len(self._spatial_args(n)) == 1 else (None,)
        if src is None or len(n.args) != 1 or n.kwargs:
            raise UnsupportedOp(opname, n.name, "is called with more than one argument")
        u = self.index[src]
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise UnsupportedOp(opname, n.name, f"uses padding_mode={m.padding_mode!r}")
            kh, kw = m.kernel_size
            (sh, sw), (dh, dw) = m.stride, m.dilation
            if isinstance(m.padding, str):
                if m.padding == "valid":
                    ph = pw = 0
                else:  # 'same' (stride 1): torch puts the odd pixel on the bottom/right
                    ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
            else:
                ph, pw = m.padding
            w = m.weight.detach()
            b = m.bias.detach() if m.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
            self._add(n, Node(n.name, "conv", (u,), axes=(Axis(kh, sh, ph, dh), Axis(kw, sw, pw, dw)),
                              weight=w, bias=b, groups=m.groups))
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k, s, p = (_pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size),
                       _pair(m.padding))
            if isinstance(m, nn.MaxPool2d):
                if m.return_indices:
                    raise UnsupportedOp(opname, n.name, "returns indices")
                d = _pair(m.dilation)
                self._add(n, Node(n.name, "maxpool", (u,), axes=(Axis(k[0], s[0], p[0], d[0]),
                                                                 Axis(k[1], s[1], p[1], d[1]))))
            else:
                self._add(n, Node(n.name, "avgpool", (u,), axes=(Axis(k[0], s[0], p[0]), Axis(k[1], s[1], p[1])),
                                  pool={"ceil_mode": m.ceil_mode, "count_include_pad": m.count_include_pad,
                                        "divisor_override": m.divisor_override}))
        elif isinstance(m, nn.BatchNorm2d):
            scale, shift = _bn_affine(m)
            self._add(n, Node(n.name, "pointwise", (u,), fn=_Affine(scale, shift)))
            self.nodes[-1].fn_name = "BatchNorm2d"
            self.nodes[-1].bn = (scale, shift)
        elif isinstance(m, _IDENTITY_MODULES):
            self._add(n, Node(n.name, "pointwise", (u,), fn=_identity))
            self.nodes[-1].fn_name = "identity"
        elif type(m) is nn.ReLU:
            self._add(n, Node(n.name, "pointwise", (u,), fn=relu, fn_name="relu"))
        elif isinstance(m, _ACTIVATION_MODULES):
            if getattr(m, "inplace", False):
                m = copy.copy(m)
                m.inplace = False
            self._add(n, Node(n.name, "pointwise", (u,), fn=m))
            self.nodes[-1].fn_name = opname
        else:
            raise UnsupportedOp(opname, n.name)

    def _function(self, n: fx.Node, opname: str) -> None:
        t = _INPLACE.get(n.target, n.target)
        if t in _IDENTITY_FUNCTIONS:
            (src,) = self._spatial_args(n)
            self._add(n, Node(n.name, "pointwise", (self.index[src],), fn=_identity))
            self.nodes[-1].fn_name = "identity"
        elif t is torch.cat or t is torch.concat:
            tensors = n.args[0]
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
            if dim not in (1, -3) or not all(isinstance(a, fx.Node) and a in self.index for a in tensors):
                raise UnsupportedOp(opname, n.name, f"concatenates along dim {dim} (only channels are supported)")
            self._add(n, Node(n.name, "concat", tuple(self.index[a] for a in tensors)))
        elif t is F.conv2d:
            self._functional_conv(n, opname)
        elif t in (F.max_pool2d, F.avg_pool2d, torch.max_pool2d):
            # torch.max_pool2d is the op F.max_pool2d wraps (same arguments, stride [] meaning the kernel)
            self._functional_pool(n, F.max_pool2d if t is torch.max_pool2d else t, opname)
        elif t is F.batch_norm:
            raise UnsupportedOp(opname, n.name, "is a functional batch_norm (use nn.BatchNorm2d)")
        elif t in _UNARY_FUNCTIONS or t in _BINARY_FUNCTIONS:
            self._generic_call(n, t, opname, binary_ok=t in _BINARY_FUNCTIONS)
        else:
            raise UnsupportedOp(opname, n.name)

    def _method(self, n: fx.Node, opname: str) -> None:
        name = n.target[:-1] if n.target.endswith("_") and not n.target.endswith("__") else n.target
        if name in _IDENTITY_METHODS:
            (src,) = self._spatial_args(n)
            self._add(n, Node(n.name, "pointwise", (self.index[src],), fn=_identity))
            self.nodes[-1].fn_name = "identity"
        elif name in _UNARY_METHODS or name in _BINARY_METHODS:
            self._generic_call(n, getattr(torch.Tensor, name), opname, binary_ok=name in _BINARY_METHODS)
        else:
            raise UnsupportedOp(opname, n.name)

    def _functional_conv(self, n: fx.Node, opname: str) -> None:
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
        a = dict(zip(names, n.args))
        a.update(n.kwargs)
        try:
            w = self._const(a["weight"])
            b = self._const(a.get("bias"))
        except KeyError:
            raise UnsupportedOp(opname, n.name, "takes its weight from the data") from None
        (src,) = [x for x in self._spatial_args(n) if x is a["input"]]
        s, p, d = _pair(a.get("stride", 1)), a.get("padding", 0), _pair(a.get("dilation", 1))
        kh, kw = w.shape[2:]
        if isinstance(p, str):
            p = (0, 0) if p == "valid" else (d[0] * (kh - 1) // 2, d[1] * (kw - 1) // 2)
        p = _pair(p)
        b = b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        self._add(n, Node(n.name, "conv", (self.index[src],),
                          axes=(Axis(kh, s[0], p[0], d[0]), Axis(kw, s[1], p[1], d[1])),
                          weight=w, bias=b, groups=int(a.get("groups", 1))))

    def _functional_pool(self, n: fx.Node, t, opname: str) -> None:
        if t is F.max_pool2d:
            names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
        else:
            names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                     "divisor_override"]
        a = dict(zip(names, n.args))
        a.update(n.kwargs)
        if a.get("return_indices"):
            raise UnsupportedOp(opname, n.name, "returns indices")
        (src,) = self._spatial_args(n)
        k = _pair(a["kernel_size"])
        s = _pair(a.get("stride") or k)
        p = _pair(a.get("padding", 0))
        if t is F.max_pool2d:
            d = _pair(a.get("dilation", 1))
            self._add(n, Node(n.name, "maxpool", (self.index[src],),
                              axes=(Axis(k[0], s[0], p[0], d[0]), Axis(k[1], s[1], p[1], d[1]))))
        else:
            self._add(n, Node(n.name, "avgpool", (self.index[src],), axes=(Axis(k[0], s[0], p[0]),
                                                                           Axis(k[1], s[1], p[1])),
                              pool={"ceil_mode": bool(a.get("ceil_mode", False)),
                                    "count_include_pad": bool(a.get("count_include_pad", True)),
                                    "divisor_override": a.get("divisor_override")}))

    # ---------------------------------------------------------------- fusion and the tail

    def _fuse(self) -> None:
        """Fold BN into a conv it alone reads, and fuse single-use pointwise chains into their producer."""
        users: dict[int, list[int]] = {v: [] for v in range(len(self.nodes))}
        for v, node in enumerate(self.nodes):
            for u in node.inputs:
                users[u].append(v)
        frontier_reads = set()
        for fx_node, v in self.index.items():
            if any(user in self.tail or user.op == "output" for user in fx_node.users):
                frontier_reads.add(v)
        merged: dict[int, int] = {}  # removed node -> node it was fused into

        def root(v: int) -> int:
            while v in merged:
                v = merged[v]
            return v

        for v, node in enumerate(self.nodes):
            if node.kind != "pointwise":
                continue
            (u,) = node.inputs
            u = root(u)
            producer = self.nodes[u]
            # fuse only where the producer's own output is needed by nobody else
            if len(users[u]) != 1 or u in frontier_reads:
                continue
            bn = node.bn
            if bn is not None and producer.kind == "conv" and not producer.post:
                scale, shift = bn
                producer.weight = producer.weight * scale.view(-1, 1, 1, 1)
                producer.bias = producer.bias * scale + shift
                producer.post_names.append("bn(folded)")
            elif node.fn is not _identity:
                producer.post.append(node.fn)
                producer.post_names.append(node.fn_name or "pointwise")
            merged[v] = u
            users[u] = users[v]
            if v in frontier_reads:
                frontier_reads.add(u)
        keep = [v for v in range(len(self.nodes)) if v not in merged]
        new = {v: i for i, v in enumerate(keep)}
        self._remap = {v: new[root(v)] for v in range(len(self.nodes))}
        nodes = []
        for v in keep:
            node = self.nodes[v]
            node.inputs = tuple(self._remap[u] for u in node.inputs)
            node.weight = node.weight.contiguous() if node.weight is not None else None
            nodes.append(node)
        self.nodes = nodes

    def _tail_module(self, output: fx.Node, frontier: list[int]) -> fx.GraphModule:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        by_index = {}
        for fx_node, v in self.index.items():
            if v in frontier and v not in by_index:
                by_index[v] = fx_node
        for v in frontier:
            env[by_index[v]] = g.placeholder(f"frontier_{v}")
        def lookup(a: fx.Node) -> fx.Node:
            if a not in env:
                if self._is_const(a):
                    env[a] = g.node_copy(a, lookup)
                else:
                    raise AssertionError(f"tail reads {a.name}, which is not in the frontier")
            return env[a]

        for n in self.gm.graph.nodes:
            if n in self.tail:
                env[n] = g.node_copy(n, lookup)
        g.node_copy(output, lookup)
        return fx.GraphModule(self.gm, g)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if len(v) else (1, 1)
    return int(v), int(v)


def relu(x):
    """ReLU as one known function, so the engine can write it straight into its buffer (``clamp_min(out=)``)."""
    return F.relu(x)


def _identity(x):
    return x


class _Affine:
    """``x * scale + shift`` per channel (a BN that could not be folded)."""

    def __init__(self, scale, shift):
        self.scale, self.shift = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)

    def __call__(self, x):
        return torch.addcmul(self.shift, x, self.scale)


def _bn_affine(m: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    if m.running_mean is None:
        raise UnsupportedOp("BatchNorm2d", "bn", "has no running statistics")
    w = m.weight.detach() if m.weight is not None else torch.ones_like(m.running_mean)
    b = m.bias.detach() if m.bias is not None else torch.zeros_like(m.running_mean)
    scale = w / torch.sqrt(m.running_var + m.eps)
    return scale, b - m.running_mean * scale
