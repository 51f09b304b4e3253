"""File formats that export writes and runtime opens, so neither imports the other.

- ONNX graphs: loading (path, bytes or proto), cifarbench's ``metadata_props``, the precision a graph computes
  (read from its ops and weights, never its metadata) and its image-in/logits-out contract (:func:`graph_io`).
- cifarbench's TensorRT engine container: ``MAGIC | u32 header length | header JSON | serialized engine``,
  whose header records the TensorRT version, GPU, precision, profile and the model's metadata.

Heavy imports (onnx, tensorrt) stay inside the functions.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import UserError

#: the ``metadata_props`` prefix of cifarbench's ONNX files
META_PREFIX = "cifarbench."


def set_metadata(proto, meta: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in meta.items():
        full = META_PREFIX + key
        if full in existing:
            existing[full].value = value
        else:
            proto.metadata_props.add(key=full, value=value)


def read_metadata(proto) -> dict[str, str]:
    return {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}


def load_onnx(source) -> "onnx.ModelProto":  # noqa: F821
    """An ONNX model from a path, bytes or a ModelProto; a missing or corrupt file is a :class:`UserError`."""
    import onnx

    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, (bytes, bytearray)):
        what, load = "in-memory ONNX model", lambda: onnx.load_model_from_string(bytes(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"no such ONNX file: {path}")
        what, load = str(path), lambda: onnx.load(str(path))
    try:
        proto = load()
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf DecodeError, ValidationError, ...: all mean "not a valid ONNX model"
        raise UserError(f"corrupt or invalid ONNX model {what}: {str(exc).splitlines()[0][:200]}") from None
    return proto


# ------------------------------------------------------------------------------------------ what a graph is

#: ops that only a quantized graph holds (QDQ pairs, QOperator and integer ops of ONNX and ONNX Runtime)
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                       "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul",
                       "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid",
                       "QLinearLeakyRelu", "QLinearSoftmax", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def graph_precision(proto) -> str:
    """``int8``, ``fp16`` or ``fp32``, read from the graph itself, never from its metadata (which anyone can
    write): quantize/dequantize or integer ops, or int8/uint8 weights feeding a conv or matmul, make it int8;
    float16 weights feeding one make it fp16."""
    from onnx import TensorProto

    graph = proto.graph
    nodes = list(graph.node) + [n for f in proto.functions for n in f.node]
    if any(n.op_type in QUANT_OPS for n in nodes):
        return "int8"
    types = {t.name: t.data_type for t in graph.initializer}
    types.update({n.output[0]: n.attribute[0].t.data_type for n in graph.node
                  if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t")})
    fed = {types.get(i) for n in nodes if n.op_type in _COMPUTE_OPS for i in n.input}
    if fed & {TensorProto.INT8, TensorProto.UINT8}:
        return "int8"
    if TensorProto.FLOAT16 in fed:
        return "fp16"
    return "fp32"


def _dims(value_info) -> list[int | str] | None:
    """A value's shape: ints for fixed dims, a name (or ``?``) for symbolic ones; ``None`` if the rank is unknown."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def _show(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def graph_io(proto, what: str) -> dict:
    """The image input and logits output of an ONNX graph, checked when it is opened, before any work:
    one input ``[N, 3, S, S]`` of float32 (N symbolic or fixed, S fixed or H and W both symbolic), a first output
    ``[N, C]`` of floats with a fixed class count ``C``. Returns ``input`` (name), ``batch`` (an int if fixed, else
    ``None``), ``input_size`` S (``None`` where the graph takes any size) and ``num_classes`` C; anything else is one :class:`UserError` naming the shape found."""
    import onnx
    from onnx import TensorProto

    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]  # IR < 4 lists initializers as inputs too
    if len(inputs) != 1:
        raise UserError(f"{what} has {len(inputs)} inputs ({', '.join(i.name for i in inputs) or 'none'}); "
                        f"cifarbench feeds one image batch [N, 3, S, S]")
    if not graph.output:
        raise UserError(f"{what} has no outputs")
    image = inputs[0]
    if image.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise UserError(f"{what}: input {image.name!r} is {_type_name(image.type.tensor_type.elem_type)}; "
                        f"cifarbench feeds float32 images in [0, 1]")
    dims = _dims(image)
    # H and W both symbolic (an export with dynamic spatial axes): the size is the source's (S = 32, or the
    # caller's input_size); one fixed and one symbolic, or two different fixed sides, are not square images
    free = dims is not None and len(dims) == 4 and not isinstance(dims[2], int) and not isinstance(dims[3], int)
    if dims is None or len(dims) != 4 or dims[1] != 3 or (not free and (not isinstance(dims[2], int) or
                                                                         dims[2] != dims[3] or dims[2] < 1)) \
            or (isinstance(dims[0], int) and dims[0] < 1):
        shown = "of unknown rank" if dims is None else _show(dims)
        raise UserError(f"{what}: input {image.name!r} is {shown}; cifarbench feeds square RGB images "
                        f"[N, 3, S, S] (S = 32 for CIFAR)")
    logits = graph.output[0]
    out = _dims(logits)
    if out is None:  # exporters that leave output shapes out: ask shape inference, on a copy
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
        out = next((_dims(o) for o in inferred.graph.output if o.name == logits.name), None)
    if out is None or len(out) != 2 or not isinstance(out[1], int) or out[1] < 1:
        shown = "of unknown shape" if out is None else _show(out)
        raise UserError(f"{what}: output {logits.name!r} is {shown}; cifarbench reads class logits [N, C] "
                        f"with a fixed class count C")
    if logits.type.tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE,
                                                 TensorProto.BFLOAT16):
        raise UserError(f"{what}: output {logits.name!r} is "
                        f"{_type_name(logits.type.tensor_type.elem_type)}, not float logits")
    io_ = {"input": image.name, "batch": dims[0] if isinstance(dims[0], int) else None,
           "input_size": None if free else dims[2], "num_classes": out[1]}
    check_supported(io_["input_size"], io_["num_classes"], what)
    return io_


def check_supported(input_size: int | None, num_classes: int, what: str) -> None:
    """What any pipeline can run: square images of 1..MAX_INPUT_SIZE pixels (the model's own S, checked against
    the images by the analyses through ``runtime.input_size``) and at least two classes (the model's own C,
    checked against the data and the class names by :func:`cifarbench.source.resolve_source`)."""
    from .source import MAX_INPUT_SIZE

    if input_size is not None and not 1 <= input_size <= MAX_INPUT_SIZE:
        raise UserError(f"{what} takes {input_size}x{input_size} images; cifarbench runs at most "
                        f"{MAX_INPUT_SIZE}x{MAX_INPUT_SIZE}")
    if num_classes < 2:
        raise UserError(f"{what} outputs {num_classes} value(s) per image; cifarbench needs one logit per class "
                        f"(at least 2)")


def _type_name(elem_type: int) -> str:
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type {elem_type}"


# ------------------------------------------------------------------------------------ TensorRT engine files

MAGIC = b"CIFBTRT1"


def pack_engine(header: dict, engine: bytes) -> bytes:
    """``MAGIC | u32 header length | header JSON | serialized engine``."""
    blob = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(blob)) + blob + engine


def unpack_engine(data: bytes, what: str = "engine") -> tuple[dict, bytes]:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise UserError(f"{what} is not a cifarbench TensorRT engine (build it with `cifarbench export --to tensorrt`)")
    (size,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start:start + size])
    except ValueError:
        raise UserError(f"corrupt TensorRT engine {what}: unreadable header") from None
    engine = data[start + size:]
    if not engine or not isinstance(header, dict):
        raise UserError(f"corrupt TensorRT engine {what}: truncated")
    return header, engine


def check_compatible(header: dict, trt_version: str, gpu_name: str, what: str = "engine") -> None:
    """Engines do not move between GPU models or TensorRT versions: say which one this was built for."""
    if header.get("trt_version") != trt_version:
        raise UserError(f"{what} was built with TensorRT {header.get('trt_version')}, this is TensorRT "
                        f"{trt_version}; rebuild it with `cifarbench export --to tensorrt`")
    if header.get("gpu") != gpu_name:
        raise UserError(f"{what} was built for {header.get('gpu')}, this GPU is {gpu_name}; "
                        f"rebuild it with `cifarbench export --to tensorrt`")


def require_tensorrt():
    """The ``tensorrt`` module, or one :class:`UserError` saying why it cannot run here."""
    import torch

    try:
        import tensorrt as trt
    except ImportError:
        raise UserError("TensorRT is not installed here (pip install tensorrt on a machine with an NVIDIA GPU); "
                        "use onnxruntime or aoti instead") from None
    if not torch.cuda.is_available():
        raise UserError("TensorRT needs an NVIDIA GPU and none is visible here; use onnxruntime or aoti instead")
    return trt
