"""INT8 ONNX: ONNX Runtime static quantization (QDQ, per-channel weights) calibrated on real training images.

Activations are uint8 and weights int8 (the u8s8 pair the VNNI/AMX kernels of ONNX Runtime's MLAS run natively);
activation ranges come from ``calib`` training images drawn with a fixed seed. The first conv (3 input channels)
and the fully connected head are kept in fp32 by default: with a 27-long dot product int8 buys nothing in the
first conv (it measured slower than fp32 here), and the head is <1 % of net4's FLOPs while quantizing it cost
most of the top-1 disagreement (net1 trained to 54 % on real CIFAR-10: agreement 98.7 % with an int8 head,
99.6 % with an fp32 head; percentile/entropy calibration and 4x more calibration images did not help).

``keep_head=False`` (``export --quantize-head``) quantizes the head's hidden layers and keeps only the logits
layer in fp32 (int8 logits cost the most: net1's logits moved by up to 5.8 against 0.45). Top-1 agreement with
fp32 of the bundled nets on 2,000 test images of the JPEG copy, MinMax on the bundled 250 images, default /
``--quantize-head``: net1 99.2 / 98.75 %, net2 99.6 / 99.45 %, net3 99.65 / 99.7 %, net4 99.85 / 99.85 % (net4's
file 11.1 -> 4.5 MB). net1 falls under verify's 99 % bound, so the fp32 head stays the default; the int8
incremental occlusion engine also reads an fp32 head only (it falls back to dense with the reason otherwise).

``calibrate_method`` is ONNX Runtime's CalibrationMethod, passed through. Measured on the same images: Percentile
(99.999th, symmetric ranges) gives net4 99.8 %, net1 98.7 %; Entropy gives MinMax's ranges exactly, because
quantize_static builds its calibrator with 128 histogram bins for 128 quantized bins (not settable through it),
so the KL search has one candidate, the full range.
:func:`precision_report` lists the layers a quantized graph computes in fp32, read from the graph itself.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..io import atomic_path, scratch_dir
from . import CALIB_METHODS, DEFAULT_CALIB_METHOD, check_calib_method

CALIB_BATCH = 64
#: what fixes missing calibration images (the zoo nets and CIFAR-10 32x32 models use the bundled set unasked)
CALIB_HINT = ("pass --calib-data PATH (training images of the model's size: an official cifar-10-batches-py folder, "
              "an image-folder root or its .tar.gz), or set CIFARBENCH_CALIB_DATA=PATH once")
#: ops whose second input is a weight matrix or filter bank: the layers int8 quantization is about
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: why a layer stays fp32, by the role :func:`quantize` excluded it for (stored in the artifact's metadata)
FP32_REASONS = {
    "first-conv": "cifarbench keeps the first conv fp32 (3 input channels: int8 is no faster)",
    "head": "cifarbench keeps the FC head fp32 (top-1 agreement); --quantize-head quantizes it",
    "logits": "cifarbench keeps the logits layer fp32 (top-1 agreement)",
}
#: a weighted layer left fp32 that cifarbench did not exclude: ONNX Runtime's quantizer chose not to
ORT_REASON = "ONNX Runtime's quantizer left it fp32 (cifarbench did not exclude it)"


def calibration_images(data: str, n: int, seed: int = 0, data_dir=None) -> torch.Tensor:
    """``n`` training images in [0, 1], a seeded random subset of ``load_split(data, "train")``."""
    from ..data import OFFLINE_HINT, load_split

    if n < 1:
        raise UserError(f"--calib must be at least 1, got {n}")
    try:
        train = load_split(data, "train", data_dir)
    except UserError as exc:
        # the loader's hint names --data, which does not reach calibration: name what does
        raise UserError(f"INT8 calibration: {str(exc).replace(OFFLINE_HINT, CALIB_HINT)}") from None
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(train), generator=g)[:n]
    return train.subset(index).float_images()


class ImageCalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a float image tensor, ``batch`` images at a time.
    ``progress(done, total)``: called with the images handed out so far, each time a batch is."""

    def __init__(self, images: torch.Tensor, input_name: str, batch: int = CALIB_BATCH, fixed: bool = False,
                 progress=None):
        self.images, self.input_name, self.batch, self.fixed = images, input_name, batch, fixed
        self.progress = progress
        self.rewind()

    def get_next(self):
        if self.position >= len(self.images):
            return None
        chunk = self.images[self.position:self.position + self.batch]
        self.position += self.batch
        if self.progress is not None:
            self.progress(min(self.position, len(self.images)), len(self.images))
        if self.fixed and len(chunk) < self.batch:  # a fixed-batch graph takes exactly that many: repeat the last
            chunk = torch.cat([chunk, chunk[-1:].expand(self.batch - len(chunk), -1, -1, -1)])
        return {self.input_name: chunk.numpy().astype(np.float32, copy=False)}

    def rewind(self) -> None:
        self.position = 0


@contextlib.contextmanager
def _temporaries_in(folder: Path):
    """ONNX Runtime's quantizer makes its own temporary folders (``ort.quant.*``, ``pre.quant.*``, a copy of the
    model each) with no option for where: point :mod:`tempfile` into our scratch folder meanwhile, so a kill -9
    leaves them inside it, where the next run's sweep removes them."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def quantize(proto, images: torch.Tensor, keep_first_conv: bool = True, keep_head: bool = True,
             per_channel: bool = True, calibrate_method: str = DEFAULT_CALIB_METHOD, keep_logits: bool = True,
             progress=None) -> "onnx.ModelProto":  # noqa: F821
    """A QDQ int8 copy of the fp32 ONNX ``proto``, calibrated on ``images`` (the graph's own input: normalized
    already where the model expects it), with cifarbench metadata. Any input name and a fixed batch work.

    ``calibrate_method``: a key of :data:`CALIB_METHODS` (ONNX Runtime's CalibrationMethod). ``keep_head``: every
    Gemm/MatMul stays fp32; without it, ``keep_logits`` still keeps the last one (the logits layer) fp32.
    ``progress(done, total)``: calibration images run so far. The metadata records the method, the head setting
    and each excluded node with the role it was excluded for (:data:`FP32_REASONS`)."""
    import json

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from . import images_sha256
    from .onnx import graph_io, graph_precision, read_metadata, set_metadata

    check_calib_method(calibrate_method)
    meta = read_metadata(proto)
    precision = graph_precision(proto)  # the graph, not its metadata, says whether it is quantized already
    if precision != "fp32":
        raise UserError(f"can only quantize an fp32 ONNX model, this one is {precision}")
    contract = graph_io(proto, "the ONNX model")
    # quant_pre_process and quantize_static work on files: a pid-named scratch folder, removed on every exit the
    # process sees, and swept by the next run after a kill -9
    with scratch_dir(tempfile.gettempdir(), "cifarbench-int8-") as tmp, _temporaries_in(tmp):
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, str(src))
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        nodes = onnx.load(str(pre)).graph.node
        convs = [n.name for n in nodes if n.op_type == "Conv"]
        head = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
        roles = {name: "head" for name in (head if keep_head else [])}
        if not keep_head and keep_logits and head:
            roles[head[-1]] = "logits"
        if keep_first_conv and convs:
            roles[convs[0]] = "first-conv"
        exclude = [n.name for n in nodes if n.name in roles]
        batch = contract["batch"] or (CALIB_BATCH if calibrate_method == "minmax" else even_batch(len(images)))
        reader = ImageCalibrationReader(images, contract["input"], batch, fixed=contract["batch"] is not None,
                                        progress=progress)
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators narrate on stdout
            quantize_static(
                str(pre), str(dst), reader, quant_format=QuantFormat.QDQ,
                per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, CALIB_METHODS[calibrate_method]),
                nodes_to_exclude=exclude, extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        quantized = onnx.load(str(dst))
    weighted = [n for n in quantized.graph.node if n.op_type in WEIGHT_OPS]
    if len(precision_report(quantized)["fp32_layers"]) >= len(weighted):
        # every conv and matmul still reads a float weight: Q/DQ pairs around activations alone are not int8
        # an "int8" file with no int8 in it would be labelled int8 everywhere it goes (bench rows, verify's
        # tolerances): say what happened instead
        kept = ", ".join(f"{name} ({roles[name]})" for name in exclude) or "none"
        raise UserError(f"nothing in the model could be quantized to int8: its weight layers are {len(convs)} "
                        f"conv(s) and {len(head)} matmul(s), and the ones cifarbench keeps fp32 are {kept}; a net "
                        f"this small gains nothing from int8 — use its fp32 ONNX export"
                        + ("" if not keep_head or len(head) < 2 else ", or --quantize-head"))
    set_metadata(quantized, {**meta, "precision": "int8", "calib_images": str(len(images)),
                             "calib_sha256": images_sha256(images), "calib_method": calibrate_method,
                             "quantize_head": "false" if keep_head else "true", "fp32_nodes": ",".join(exclude),
                             "fp32_roles": json.dumps({name: roles[name] for name in exclude})})
    onnx.checker.check_model(quantized)
    return quantized


def even_batch(n: int, most: int = CALIB_BATCH) -> int:
    """The largest batch size up to ``most`` that divides ``n``. ONNX Runtime's histogram calibrators (entropy,
    percentile) stack every batch's outputs with ``np.asarray`` and fail on a shorter last batch ("inhomogeneous
    shape"); they keep all outputs anyway, so the batch size changes only how many runs it takes, not the result."""
    return next(b for b in range(min(most, n), 0, -1) if n % b == 0)


def precision_report(proto) -> dict:
    """What a quantized graph computes in fp32, read from the graph (never its metadata, except for the reasons):
    ``fp32_layers``, every :data:`WEIGHT_OPS` node whose weight is a float initializer (a quantized one reads
    ``DequantizeLinear`` of int8 instead), with its weight's name and bytes and why it stayed fp32; and ``bytes``,
    the initializers' bytes by type: ``int8`` (int8/uint8 weights and zero points), ``fp32`` (float weights,
    biases and scales) and ``other`` (int32 quantized biases, int64 shapes)."""
    import json

    from onnx import TensorProto

    from .onnx import read_metadata

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    inits = {t.name: t for t in proto.graph.initializer}
    roles = json.loads(read_metadata(proto).get("fp32_roles") or "{}")
    layers = []
    for node in proto.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        # Conv/Gemm take the weight second; a MatMul may hold it on either side
        candidates = node.input[:2] if node.op_type == "MatMul" else node.input[1:2]
        weight = next((inits[i] for i in candidates if i in inits and inits[i].data_type in floats), None)
        if weight is None:
            continue
        layers.append({"name": node.name, "op": node.op_type, "weight": weight.name,
                       "weight_bytes": _tensor_bytes(weight),
                       "why": FP32_REASONS.get(roles.get(node.name), ORT_REASON)})
    split = {"int8": 0, "fp32": 0, "other": 0}
    for t in proto.graph.initializer:
        kind = "int8" if t.data_type in (TensorProto.INT8, TensorProto.UINT8) else \
            "fp32" if t.data_type in floats else "other"
        split[kind] += _tensor_bytes(t)
    return {"fp32_layers": layers, "bytes": split}


def _tensor_bytes(tensor) -> int:
    """The bytes a tensor's values take (its element count times the element size, from its header)."""
    import math

    from onnx import helper

    return math.prod(tensor.dims) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def export_int8(model_or_onnx, out: str | Path, images: torch.Tensor, source=None, **options) -> Path:
    """Quantize a torch model (exported to ONNX first), an fp32 ONNX file or proto to ``out``. ``images``: the
    graph's own input. ``source``: the model source whose contract (classes, mean/std, size) goes into the
    metadata (a user's ONNX file may carry none)."""
    import onnx

    from .onnx import load_onnx, model_metadata, to_onnx_proto

    proto = to_onnx_proto(model_or_onnx) if isinstance(model_or_onnx, torch.nn.Module) else load_onnx(model_or_onnx)
    if source is not None:
        proto = _with_meta(proto, model_metadata(source))
    quantized = quantize(proto, images, **options)
    out = Path(out)
    with atomic_path(out) as tmp:
        onnx.save(quantized, str(tmp))
    return out


def _with_meta(proto, meta: dict):
    """A copy of ``proto`` with ``meta`` added to its cifarbench metadata (existing keys win: they describe it)."""
    import onnx

    from .onnx import read_metadata, set_metadata

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    set_metadata(out, {**meta, **read_metadata(proto)})
    return out


# Compatibility: ``int8_accuracy_report`` runs runtimes, so it moved up to :mod:`cifarbench.artifacts` (export never
# imports runtime); the name still resolves here, on first use only.
def __getattr__(name):
    if name == "int8_accuracy_report":
        from ..artifacts import int8_accuracy_report

        return int8_accuracy_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
