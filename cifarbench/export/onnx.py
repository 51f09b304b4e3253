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


def export_onnx(model, out: str | Path) -> Path:
    import onnx

    out = Path(out)
    proto = to_onnx_proto(model)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    return out
