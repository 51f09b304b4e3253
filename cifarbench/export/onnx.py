"""ONNX export: dynamic batch, normalization inside the graph, the net's identity in ``metadata_props``.

The graph takes ``images`` float32 [N, 3, 32, 32] in [0, 1] and returns ``logits`` float32 [N, 10], the same
contract as every other runtime. The metadata (net, spec, hyper-parameters, classes, the source checkpoint's
sha256, precision) travels inside the file, so an ``.onnx`` alone is enough to rebuild a runtime, a report or a
TensorRT engine, and a derived artifact can say which checkpoint it came from.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_path

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
OPSET = 18
META_PREFIX = "cifarbench."


def model_digest(model) -> str:
    """sha256 of the net, its hyper-parameters and its weights: the cache key of every derived artifact.

    Content, not file: a module changed in memory (a zeroed filter) never hits the cache of its source
    checkpoint, and the same weights loaded from two copies of a checkpoint share one entry."""
    h = hashlib.sha256(json.dumps({"net": model.name, "hparams": model.hparams}, sort_keys=True).encode())
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def source_sha256(model) -> str:
    """sha256 of the checkpoint file the model was loaded from, else of its weights (an in-memory model)."""
    source = getattr(model, "source", None)
    if source and Path(source).is_file():
        from ..checkpoint import file_sha256

        return file_sha256(source)
    return model_digest(model)


def model_metadata(model, precision: str = "fp32") -> dict[str, str]:
    """What an artifact records about its source model (string values, as ONNX ``metadata_props`` require)."""
    from .. import __version__
    from ..data import CLASSES

    return {
        "net": model.name,
        "spec": json.dumps(model.spec, sort_keys=True),
        "hparams": json.dumps(model.hparams, sort_keys=True),
        "classes": json.dumps(list(CLASSES)),
        "source_sha256": source_sha256(model),
        "weights_sha256": model_digest(model),
        "source": str(getattr(model, "source", "") or "in-memory"),
        "precision": precision,
        "cifarbench_version": __version__,
    }


def to_onnx_proto(model) -> "onnx.ModelProto":  # noqa: F821
    """The model as a checked, constant-folded ONNX graph with dynamic batch and cifarbench metadata."""
    import onnx

    model = model.eval().to("cpu")
    example = torch.rand(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1)
    # the exporter narrates on stdout; keep stdout clean for --json
    with contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False):
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    proto = program.model_proto
    set_metadata(proto, model_metadata(model))
    onnx.checker.check_model(proto, full_check=True)
    return proto


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

#: what today's pipelines feed and read: 32x32 CIFAR images and the 10 CIFAR-10 classes (see check_supported)
EXPECTED_SIZE = 32
EXPECTED_CLASSES = 10
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
    one input ``[N, 3, S, S]`` of float32 (N symbolic or fixed), a first output ``[N, C]`` of floats with a fixed
    class count ``C``. Returns ``input`` (name), ``batch`` (an int if fixed, else ``None``), ``input_size`` S and
    ``num_classes`` C; anything else is one :class:`UserError` naming the shape found."""
    import onnx
    from onnx import TensorProto

    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]  # IR < 4 lists initializers as inputs too
    if len(inputs) != 1:
        raise UserError(f"{what} has {len(inputs)} inputs ({', '.join(i.name for i in inputs) or 'none'}); "
                        f"cifarbench feeds one image batch [N, 3, {EXPECTED_SIZE}, {EXPECTED_SIZE}]")
    if not graph.output:
        raise UserError(f"{what} has no outputs")
    image = inputs[0]
    if image.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise UserError(f"{what}: input {image.name!r} is {_type_name(image.type.tensor_type.elem_type)}; "
                        f"cifarbench feeds float32 images in [0, 1]")
    dims = _dims(image)
    if dims is None or len(dims) != 4 or dims[1] != 3 or not isinstance(dims[2], int) or dims[2] != dims[3] \
            or dims[2] < 1 or (isinstance(dims[0], int) and dims[0] < 1):
        shown = "of unknown rank" if dims is None else _show(dims)
        raise UserError(f"{what}: input {image.name!r} is {shown}; cifarbench feeds square RGB images "
                        f"[N, 3, S, S] (S = {EXPECTED_SIZE} for CIFAR)")
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
    io_ = {"input": image.name, "batch": dims[0] if isinstance(dims[0], int) else None, "input_size": dims[2],
           "num_classes": out[1]}
    check_supported(io_["input_size"], io_["num_classes"], what)
    return io_


def check_supported(input_size: int, num_classes: int, what: str) -> None:
    """The one place that says which models today's pipelines can run: they feed 32x32 images and name the 10
    CIFAR-10 classes. (Relax this, and only this, when the pipelines take other sizes and class sets.)"""
    if input_size != EXPECTED_SIZE:
        raise UserError(f"{what} takes {input_size}x{input_size} images; cifarbench runs "
                        f"{EXPECTED_SIZE}x{EXPECTED_SIZE} CIFAR models")
    if num_classes != EXPECTED_CLASSES:
        raise UserError(f"{what} outputs {num_classes} classes; cifarbench runs CIFAR-10 models with "
                        f"{EXPECTED_CLASSES} classes")


def _type_name(elem_type: int) -> str:
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type {elem_type}"


def export_onnx(model, out: str | Path) -> Path:
    import onnx

    out = Path(out)
    proto = to_onnx_proto(model)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    return out
