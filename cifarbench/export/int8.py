"""INT8 ONNX: ONNX Runtime static quantization (QDQ, per-channel weights) calibrated on real training images.

Activations are uint8 and weights int8 (the u8s8 pair the VNNI/AMX kernels of ONNX Runtime's MLAS run natively);
activation ranges come from ``calib`` training images drawn with a fixed seed. The first conv (3 input channels)
and the fully connected head are kept in fp32 by default: with a 27-long dot product int8 buys nothing in the
first conv (it measured slower than fp32 here), and the head is <1 % of net4's FLOPs while quantizing it cost
most of the top-1 disagreement (net1 trained to 54 % on real CIFAR-10: agreement 98.7 % with an int8 head,
99.6 % with an fp32 head; percentile/entropy calibration and 4x more calibration images did not help).
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

CALIB_BATCH = 64


def calibration_images(data: str, n: int, seed: int = 0, data_dir=None) -> torch.Tensor:
    """``n`` training images in [0, 1], a seeded random subset of ``load_split(data, "train")``."""
    from ..data import load_split

    if n < 1:
        raise UserError(f"--calib must be at least 1, got {n}")
    train = load_split(data, "train", data_dir)
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(train), generator=g)[:n]
    return train.subset(index).float_images()


class ImageCalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a float image tensor, ``batch`` images at a time."""

    def __init__(self, images: torch.Tensor, input_name: str, batch: int = CALIB_BATCH, fixed: bool = False):
        self.images, self.input_name, self.batch, self.fixed = images, input_name, batch, fixed
        self.rewind()

    def get_next(self):
        if self.position >= len(self.images):
            return None
        chunk = self.images[self.position:self.position + self.batch]
        self.position += self.batch
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
             per_channel: bool = True, calibrate_method: str = "minmax") -> "onnx.ModelProto":  # noqa: F821
    """A QDQ int8 copy of the fp32 ONNX ``proto``, calibrated on ``images`` (the graph's own input: normalized
    already where the model expects it), with cifarbench metadata. Any input name and a fixed batch work."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from . import images_sha256
    from .onnx import graph_io, graph_precision, read_metadata, set_metadata

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibrate_method not in methods:
        raise UserError(f"unknown calibration method {calibrate_method!r}; known: {', '.join(methods)}")
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
        exclude = (convs[:1] if keep_first_conv else []) + \
            ([n.name for n in nodes if n.op_type in ("Gemm", "MatMul")] if keep_head else [])
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators narrate on stdout
            quantize_static(
                str(pre), str(dst), ImageCalibrationReader(images, contract["input"], contract["batch"] or CALIB_BATCH,
                                                  fixed=contract["batch"] is not None), quant_format=QuantFormat.QDQ,
                per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=methods[calibrate_method], nodes_to_exclude=exclude,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        quantized = onnx.load(str(dst))
    set_metadata(quantized, {**meta, "precision": "int8", "calib_images": str(len(images)),
                             "calib_sha256": images_sha256(images),
                             "calib_method": calibrate_method, "fp32_nodes": ",".join(exclude)})
    onnx.checker.check_model(quantized)
    return quantized


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
