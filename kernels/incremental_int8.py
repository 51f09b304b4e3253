"""The incremental occlusion engine on the int8 convolutions of an ``onnx-int8`` artifact.

The INT8 runtime (:mod:`cifarbench.export.int8`) is a QDQ graph: each quantized conv reads
``DequantizeLinear(uint8 input)`` and ``DequantizeLinear(int8 per-channel weights)``, adds an int32 bias, and
its output goes through ``QuantizeLinear`` (zero point 0, so the uint8 saturation is the ReLU). ONNX Runtime
fuses every such group into one ``QLinearConv``. This module reads the same integers and scales out of the graph
and runs the incremental plan of :mod:`cifarbench.kernels.incremental` on them with uint8 NHWC rows in the
buffers, so the gathers move a quarter of the fp32 bytes. Convs the artifact keeps in fp32 (the first one, by
default) and the fp32 head run in torch with the artifact's own weights; the head's first weights absorb the
scale of the uint8 rows they read.

Two backends run the int8 convolutions, with the same integers and scales (``conv_backend``):

* ``"onednn"`` (the default where torch has it): oneDNN's int8 convolution (``torch.ops.onednn``), which uses
  AMX-INT8 or AVX512-VNNI where the CPU has them, with ONNX Runtime's requantization done in torch, so the
  outputs are the same integers (:class:`OnednnQConv`). On net4's three largest layers (Sapphire Rapids, one
  thread) it is 1.6-3x faster than ONNX Runtime's ``QLinearConv``, which was 73 % of the engine's time.
* ``"onnxruntime"``: one small ONNX Runtime session per conv, a channels-last ``QLinearConv`` on the engine's
  uint8 NHWC rows (with a ``QuantizeLinear`` in front where the previous layer ran in fp32), run through
  IOBinding straight on the window buffers. Used where torch lacks oneDNN's int8 conv (non-x86 builds), for a
  conv oneDNN cannot take as it is (non-zero zero points), or when asked for.

Why it is the same model: with static quantization every activation value is a function of its receptive field
only (fixed scales, integer accumulation), so a window computes exactly what the whole-image int8 graph computes
there. The one source of difference is the fp32 first conv (oneDNN here, MLAS in the dense graph, different
summation order), which can move a value across a rounding boundary of the next layer's quantizer by one step.
"""
from __future__ import annotations

import functools
import threading

import numpy as np
import torch
import torch.nn.functional as F

from .incremental import IMAGE_SIZE, IncrementalOcclusion, LayerSpec, TorchConv, cpu_workers, nhwc_head

_PASS_THROUGH = ("QuantizeLinear", "DequantizeLinear", "Relu")
CONV_BACKENDS = ("auto", "onednn", "onnxruntime")


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether oneDNN's int8 convolution runs here with ONNX Runtime's integers: a CPU with AVX512-VNNI (AMX-INT8
    CPUs have it too), where both libraries accumulate u8 x s8 products exactly in int32; without VNNI both fall
    back to ``vpmaddubsw``, whose int16 pair sums saturate, each library pairing differently. Then a tiny conv
    through ``onednn::qconv2d_pointwise``, since an ARM build or an old torch lacks it. Probed once."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    try:
        if vnni is None or not vnni():
            return False
        OnednnQConv(np.ones((1, 1, 1, 1), np.int8), np.float32(1), np.int8(0), np.zeros(1, np.int32), 1.0, 0, 1.0,
                    1, 0, float_input=False, threads=1).window(torch.ones(1, 1, 1, 1, dtype=torch.uint8),
                                                                 torch.empty(1, 1, 1, 1, dtype=torch.uint8))
        return True
    except Exception:  # noqa: BLE001 -- whatever a missing or different op raises, the answer is "not here"
        return False


class OnednnQConv:
    """One int8 conv + ReLU on oneDNN's int8 convolution (``torch.ops.onednn``), the same interface and the same
    integers as :class:`OrtQLinearConv`: NHWC uint8 (or float, quantized first) rows in, uint8 rows with zero
    point 0 out (its saturation is the ReLU).

    Bit-identical to ``QLinearConv`` (checked per layer in the tests): oneDNN runs with unit scales and the int32
    bias as a float, so its float output is ``float(acc + bias)`` exactly (while ``|acc + bias| < 2**24``; a conv
    whose sums could pass that where it matters is refused with ``ValueError``, and ``auto`` runs it on ONNX
    Runtime), and the requantization is ORT's own: ``round_half_even(float(acc + bias) * s)``, saturated, with
    ``s = x_scale * w_scale / y_scale`` in float32 as ORT computes it. Letting oneDNN requantize instead (scaled
    sum plus a float bias) is 1.65x faster on the largest layer but differs in 5e-7 of the outputs by one step,
    and on a real image those steps spread to 0.2 % of the last layer and 1e-3 of the map."""

    int8_output = True
    backend = "onednn"

    def __init__(self, weight, w_scale, w_zero, bias, x_scale, x_zero, y_scale, stride: int, padding: int,
                 float_input: bool, threads: int):
        del threads  # the calling worker's torch thread count applies (the engine sets one per worker)
        self.s, self.q, self.k = stride, padding, weight.shape[2]
        self.c_out = weight.shape[0]
        self.x_scale, self.y_scale, self.float_input = np.float32(x_scale), float(y_scale), float_input
        if np.any(np.asarray(w_zero) != 0) or int(x_zero) != 0:
            raise ValueError("oneDNN's int8 conv here takes zero points of 0 only")
        w_scale = np.broadcast_to(np.asarray(w_scale, np.float32), (self.c_out,))
        scale = self.x_scale * w_scale / np.float32(y_scale)
        # float(acc) + float(bias) is float(acc + bias) while sums stay below 2**24 (float32's exact integers);
        # beyond, the two round differently, which matters only where the scale lets such a sum land below 255.5
        reach = 255 * np.abs(np.asarray(weight, np.int64)).reshape(self.c_out, -1).sum(1) + \
            np.abs(np.asarray(bias, np.int64))
        if np.any((reach >= 2 ** 24) & (scale.astype(np.float64) * 2 ** 24 < 256)):
            raise ValueError("int32 sums beyond float32's exact integers at a small output scale")
        self.scale = torch.from_numpy(scale).view(1, -1, 1, 1)
        self.ones, self.zeros = torch.ones(self.c_out), torch.zeros(self.c_out, dtype=torch.long)
        self.bias = torch.from_numpy(np.asarray(bias, np.int32).astype(np.float32))
        self.packed = torch.ops.onednn.qconv_prepack(torch.from_numpy(np.array(weight, np.int8)), self.ones, 1.0, 0,
                                                     [stride] * 2, [0, 0], [1, 1], 1, None)

    def window(self, x: torch.Tensor, out: torch.Tensor, scratch: dict | None = None) -> None:
        """NHWC ``x`` ``[R, hin, win, C]`` (padding already in it) into NHWC uint8 ``out``; no ``scratch``
        needed."""
        if self.float_input:  # QuantizeLinear: divide, round half to even, saturate
            x = torch.div(x, float(self.x_scale)).round_().clamp_(0, 255).to(torch.uint8)
        y = torch.ops.onednn.qconv2d_pointwise(x.permute(0, 3, 1, 2), 1.0, 0, self.packed, self.ones, self.zeros,
                                               self.bias, [self.s] * 2, [0, 0], [1, 1], 1, 1.0, 0, torch.float32,
                                               "none", [], "")
        out.permute(0, 3, 1, 2).copy_(y.mul_(self.scale).round_().clamp_(0, 255))

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """The whole map with the layer's padding, ``[N, C, H, W]`` in and out (channels-last memory); zero
        padding is the zero point, as in :meth:`OrtQLinearConv.full`."""
        xp = F.pad(x, (self.q,) * 4).permute(0, 2, 3, 1).contiguous()
        n, h, w, _ = xp.shape
        out = torch.empty(n, (h - self.k) // self.s + 1, (w - self.k) // self.s + 1, self.c_out, dtype=torch.uint8)
        self.window(xp, out)
        return out.permute(0, 3, 1, 2)


def int8_conv_class(backend: str = "auto"):
    """The int8 conv class for ``backend`` (one of :data:`CONV_BACKENDS`): ``auto`` is oneDNN where torch has it,
    else ONNX Runtime."""
    if backend not in CONV_BACKENDS:
        raise ValueError(f"int8 conv backend {backend!r}: choose from {', '.join(CONV_BACKENDS)}")
    if backend == "onednn" and not onednn_available():
        raise ValueError("oneDNN's int8 conv does not run here with ONNX Runtime's integers (it needs an x86 CPU "
                         "with AVX512-VNNI and torch's onednn ops)")
    if backend == "onnxruntime" or (backend == "auto" and not onednn_available()):
        return OrtQLinearConv
    return OnednnQConv


class OrtQLinearConv:
    """One int8 conv + ReLU through one ONNX Runtime session, NHWC in and out: uint8 input rows (or float ones,
    quantized first when the previous layer ran in fp32), uint8 output rows with zero point 0."""

    int8_output = True
    backend = "onnxruntime"

    def __init__(self, weight, w_scale, w_zero, bias, x_scale, x_zero, y_scale, stride: int, padding: int,
                 float_input: bool, threads: int):
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        self.s, self.q, self.k = stride, padding, weight.shape[2]
        self.c_out, c_in = weight.shape[:2]
        self.y_scale, self.float_input = float(y_scale), float_input
        inits = [numpy_helper.from_array(np.asarray(v), name) for name, v in (
            ("xs", np.float32(x_scale)), ("xz", np.uint8(x_zero)), ("w", weight), ("ws", w_scale), ("wz", w_zero),
            ("ys", np.float32(y_scale)), ("yz", np.uint8(0)), ("b", bias))]
        nodes = [helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                                  domain="com.microsoft", channels_last=1, kernel_shape=[self.k] * 2,
                                  strides=[stride] * 2, pads=[0] * 4)]
        if float_input:
            nodes.insert(0, helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]))
        else:
            nodes[0].input[0] = "x"
        graph = helper.make_graph(nodes, "qconv", [helper.make_tensor_value_info(
            "x", TensorProto.FLOAT if float_input else TensorProto.UINT8, ["n", "h", "w", int(c_in)])],
            [helper.make_tensor_value_info("y", TensorProto.UINT8, ["n", "oh", "ow", int(self.c_out)])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # torch runs between these calls: ORT workers spinning after a run would steal its cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self._local = threading.local()  # a session runs from several workers at once; a binding is per call

    def window(self, x: torch.Tensor, out: torch.Tensor, scratch: dict | None = None) -> None:
        """NHWC ``x`` ``[R, hin, win, C]`` (padding already in it) into NHWC uint8 ``out``: both contiguous CPU
        tensors; ONNX Runtime reads and writes their memory directly. ``scratch`` is not needed."""
        assert x.is_contiguous() and out.is_contiguous(), "IOBinding needs contiguous buffers"
        b = getattr(self._local, "binding", None)
        if b is None:
            b = self._local.binding = self.session.io_binding()
        b.bind_input("x", "cpu", 0, np.float32 if self.float_input else np.uint8, tuple(x.shape), x.data_ptr())
        b.bind_output("y", "cpu", 0, np.uint8, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(b)

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """The whole map with the layer's padding, ``[N, C, H, W]`` in and out (channels-last memory). A zero pad
        is the zero point (0 for float input, quantized), which is what QLinearConv pads with."""
        xp = F.pad(x, (self.q,) * 4).permute(0, 2, 3, 1).contiguous()
        n, h, w, _ = xp.shape
        out = torch.empty(n, (h - self.k) // self.s + 1, (w - self.k) // self.s + 1, self.c_out, dtype=torch.uint8)
        self.window(xp, out)
        return out.permute(0, 3, 1, 2)


class Int8Graph:
    """Reads a QDQ int8 ONNX graph of a :class:`~cifarbench.nets.CifarNet` (as exported by cifarbench) into layer
    specs, conv ops and the fp32 head; raises ``ValueError`` for any graph it does not recognise."""

    def __init__(self, proto, threads: int = 1, conv_backend: str = "auto"):
        from onnx import numpy_helper

        self.threads, self.conv_backend = threads, conv_backend
        self.conv_class = int8_conv_class(conv_backend)
        graph = proto.graph
        self.arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.nodes = list(graph.node)

    def const(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise ValueError(f"{name} is not a constant")
        return self.arrays[name]

    def source(self, name: str) -> str:
        """The tensor ``name`` is computed from, looking through quantize/dequantize/ReLU nodes."""
        while name in self.producer and self.producer[name].op_type in _PASS_THROUGH:
            name = self.producer[name].input[0]
        return name

    def attrs(self, node) -> dict:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def producer_op(self, name: str, op: str):
        node = self.producer.get(name)
        if node is None or node.op_type != op:
            raise ValueError(f"{name} is not produced by {op}")
        return node

    def next_op(self, name: str, op: str):
        found = [n for n in self.consumers.get(name, []) if n.op_type == op]
        if len(found) != 1:
            raise ValueError(f"{name} does not feed exactly one {op}")
        return found[0]

    def normalization(self) -> tuple[float, float, str]:
        """``(mean, std, output)`` of the graph's leading ``(x - mean) / std``."""
        subs, divs = self.nodes_of("Sub"), self.nodes_of("Div")
        if not (subs and divs and divs[0].input[0] == subs[0].output[0]):
            raise ValueError("no (x - mean) / std at the graph input")
        sub, div = subs[0], divs[0]
        return float(self.const(sub.input[1])), float(self.const(div.input[1])), div.output[0]

    def nodes_of(self, *ops: str) -> list:
        return [n for n in self.nodes if n.op_type in ops]

    def layers(self):
        """``(specs, convs, head, mean, std)`` for :class:`Int8IncrementalOcclusion`."""
        mean, std, previous = self.normalization()
        specs, convs, size, ch, quantized = [], [], IMAGE_SIZE, 3, False
        for node in self.nodes_of("Conv", "MaxPool"):
            if self.source(node.input[0]) != previous:
                raise ValueError(f"{node.name} does not follow the previous layer (not a plain conv chain)")
            a = self.attrs(node)
            k, s = a["kernel_shape"][0], a.get("strides", [1, 1])[0]
            pads = set(a.get("pads", [0] * 4))
            if len(pads) != 1 or len(set(a["kernel_shape"])) != 1 or len(set(a.get("strides", [1]))) != 1:
                raise ValueError(f"{node.name}: only square kernels, strides and symmetric pads are handled")
            q = pads.pop()
            if node.op_type == "MaxPool":
                if (k, s, q) != (2, 2, 0):
                    raise ValueError(f"{node.name}: only 2x2 max-pools are handled")
                kind, cout = "pool", ch
            else:
                if a.get("group", 1) != 1 or set(a.get("dilations", [1])) != {1}:
                    raise ValueError(f"{node.name}: grouped or dilated convs are not handled")
                conv = self.conv(node, s, q, quantized)
                convs.append(conv)
                quantized = getattr(conv, "int8_output", False)
                kind, cout = "conv", conv.c_out
            out = (size + 2 * q - k) // s + 1
            specs.append(LayerSpec(kind, k, s, q, size, out, ch, cout))
            size, ch, previous = out, cout, node.output[0]
        if not quantized:
            raise ValueError("no int8 conv in the graph")
        return tuple(specs), convs, self.head(previous, specs[-1], convs[-1].y_scale), mean, std

    def conv(self, node, s: int, q: int, quantized_input: bool):
        weight = node.input[1]
        if weight in self.arrays:  # kept in fp32 by the quantizer: runs in torch, ReLU after it
            if quantized_input:
                raise ValueError(f"{node.name}: an fp32 conv after an int8 one is not handled")
            self.next_op(node.output[0], "Relu")
            w = torch.from_numpy(self.const(weight).astype(np.float32))
            bias = torch.from_numpy(self.const(node.input[2]).astype(np.float32)) if len(node.input) > 2 \
                else torch.zeros(w.shape[0])
            return TorchConv(w, bias, s, q)
        wq = self.producer_op(weight, "DequantizeLinear")
        xq = self.producer_op(node.input[0], "DequantizeLinear")
        bq = self.producer_op(node.input[2], "DequantizeLinear")
        out = node.output[0]
        relu = [n for n in self.consumers.get(out, []) if n.op_type == "Relu"]
        yq = self.next_op(relu[0].output[0] if relu else out, "QuantizeLinear")
        x_scale, x_zero = self.const(xq.input[1]), self.const(xq.input[2])
        w_scale, w_zero = self.const(wq.input[1]), self.const(wq.input[2])
        y_scale, y_zero = self.const(yq.input[1]), self.const(yq.input[2])
        bias, b_scale = self.const(bq.input[0]), self.const(bq.input[1])
        if int(y_zero) != 0 or y_zero.dtype != np.uint8:
            raise ValueError(f"{node.name}: output zero point {int(y_zero)} does not imply the ReLU")
        if bias.dtype != np.int32 or not np.allclose(b_scale, x_scale * w_scale, rtol=1e-5):
            raise ValueError(f"{node.name}: bias is not int32 at input scale x weight scale")
        if int(x_zero) != 0:
            raise ValueError(f"{node.name}: input zero point {int(x_zero)} (the engine pads with 0)")
        args = (self.const(wq.input[0]), w_scale, w_zero, bias, x_scale, x_zero, y_scale, s, q)
        try:
            return self.conv_class(*args, float_input=not quantized_input, threads=self.threads)
        except (ValueError, RuntimeError):
            if self.conv_backend != "auto":
                raise
            # a conv oneDNN cannot take as it is (asymmetric weights, sums too large for exact float, an op
            # that rejects it) runs on ONNX Runtime, the others stay
            return OrtQLinearConv(*args, float_input=not quantized_input, threads=self.threads)

    def head(self, previous: str, last: LayerSpec, in_scale: float) -> list:
        """The fp32 Gemms; FC1's weights times the scale of the uint8 rows it reads (their zero point is 0)."""
        gemms = self.nodes_of("Gemm")
        if not gemms or self.source(self.producer_op(self.source(gemms[0].input[0]), "Reshape").input[0]) \
                != previous:
            raise ValueError("the head does not read the flattened last layer")
        linears = []
        for i, g in enumerate(gemms):
            a = self.attrs(g)
            if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
                raise ValueError(f"{g.name}: only plain Gemm (x @ W.T + b) is handled")
            w = self.const(g.input[1]).astype(np.float32)
            w = w if a.get("transB", 0) else w.T
            if i < len(gemms) - 1:
                self.next_op(g.output[0], "Relu")
            linears.append((torch.from_numpy(np.ascontiguousarray(w)),
                            torch.from_numpy(self.const(g.input[2]).astype(np.float32))))
        if linears[0][0].shape[1] != last.c_out * last.s_out ** 2:
            raise ValueError("the head's input size does not match the last layer")
        linears[0] = (linears[0][0] * in_scale, linears[0][1])
        return nhwc_head(linears, last)


class Int8IncrementalOcclusion(IncrementalOcclusion):
    """:class:`IncrementalOcclusion` with the int8 model of an ``onnx-int8`` artifact (``proto``), on the CPU;
    ``conv_backend`` picks the int8 convolutions (:data:`CONV_BACKENDS`, module docstring)."""

    def __init__(self, proto, chunk: int = 160, buckets: int = 3, workers: int | None = None,
                 conv_backend: str = "auto"):
        workers = workers or cpu_workers()
        # with one chunk per core in flight, each session call runs on its worker's core
        threads = 1 if workers > 1 else cpu_workers()
        specs, convs, head, mean, std = Int8Graph(proto, threads, conv_backend).layers()
        self._setup(specs, convs, head, "cpu", chunk, buckets, mean, std, workers=workers)

    @property
    def int8_convs(self) -> str:
        """Which backend ran the int8 convolutions: ``onednn``, ``onnxruntime``, or both joined by ``+``."""
        return "+".join(sorted({c.backend for c in self.convs if getattr(c, "int8_output", False)}))
