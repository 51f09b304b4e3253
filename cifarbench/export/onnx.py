"""ONNX export of any torch model source: dynamic batch, the model's input contract in ``metadata_props``.

The graph is the model's own module: ``images`` float32 [N, 3, S, S] -> ``logits`` float32 [N, C]. A zoo net
normalizes inside, so its graph takes [0, 1] pixels; a user model that expects normalized input keeps expecting it,
and its ``mean``/``std`` are recorded in the metadata with the class names and input size, so the ``.onnx`` alone
resolves back to the same contract (:func:`cifarbench.source.resolve_source`) and a runtime applies it. Normalization
is never baked into a graph: an edited copy of the graph (ablation, probes) still matches the user's own layers.
Reading graphs (metadata, precision, shapes) lives in :mod:`cifarbench.formats`, shared with the runtimes.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

from ..errors import UserError
from ..formats import (  # noqa: F401  (re-exported: the reading half lives below export and runtime)
    META_PREFIX, QUANT_OPS, check_supported, graph_io, graph_precision, load_onnx, read_metadata, set_metadata,
)
from ..io import atomic_path

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
OPSET = 18


def model_digest(model) -> str:
    """The content digest of ``model`` (a module or a :class:`~cifarbench.source.ModelSource`): the cache key of
    every derived artifact. Content, not file or name: a module changed in memory (a zeroed filter) never hits the
    cache of its source checkpoint, and the same weights loaded from two copies of a checkpoint share one entry."""
    from ..source import ModelSource, module_digest

    if isinstance(model, ModelSource):
        return model.digest
    if isinstance(model, torch.nn.Module):
        return module_digest(model)
    return as_source(model).digest


def as_source(model, **contract):
    """``model`` as a :class:`~cifarbench.source.ModelSource` (a source passes through unchanged)."""
    from ..source import resolve_source

    return resolve_source(model, **{k: v for k, v in contract.items() if v is not None})


def source_sha256(source) -> str:
    """sha256 of the file the model was loaded from, else its content digest (an in-memory model)."""
    from ..source import file_digest

    origin = getattr(source.module, "source", None) if source.module is not None else None
    if origin and Path(origin).is_file():
        return file_digest(Path(origin))
    if source.path is not None and Path(source.path).is_file() and source.kind != "state-dict":
        return source.digest  # a file source's digest is the file's own sha256 (plus external data for ONNX)
    return source.digest


def model_metadata(model, precision: str = "fp32") -> dict[str, str]:
    """What an artifact records about its source (string values, as ONNX ``metadata_props`` require): the net's
    name, its input contract (``input_size``, ``num_classes``, ``classes``, and ``mean``/``std`` when cifarbench
    normalizes for the model: an artifact takes the model's own input, so the contract travels with it and
    :func:`cifarbench.source.resolve_source` reads it back), digests and versions. A zoo net adds its ``spec`` and
    ``hparams`` (which also say: normalization is inside the graph)."""
    from .. import __version__
    from ..nets import CifarNet

    source = as_source(model)
    meta = {
        "net": source.name,
        "classes": json.dumps(list(source.classes)),
        "input_size": str(source.input_size),
        "num_classes": str(source.num_classes),
        "source_sha256": source_sha256(source),
        "weights_sha256": source.digest,
        "source": str(getattr(source.module, "source", "") or source.path or "in-memory"),
        "precision": precision,
        "cifarbench_version": __version__,
    }
    if isinstance(source.module, CifarNet):
        meta["spec"] = json.dumps(source.module.spec, sort_keys=True)
        meta["hparams"] = json.dumps(source.module.hparams, sort_keys=True)
    if source.mean is not None:
        meta["mean"], meta["std"] = json.dumps(list(source.mean)), json.dumps(list(source.std))
    if source.kind not in ("zoo", "checkpoint", "module"):
        meta["source_kind"] = source.kind
    return meta


def to_onnx_proto(model) -> "onnx.ModelProto":  # noqa: F821
    """The model's own module (a module or a torch :class:`~cifarbench.source.ModelSource`) as a checked,
    constant-folded ONNX graph: input ``images`` [N, 3, S, S] (the model's own input: normalized when the source
    has ``mean``/``std``), output ``logits`` [N, C], dynamic batch unless the source has a fixed one, and the
    cifarbench metadata of :func:`model_metadata`."""
    import onnx

    source = as_source(model)
    if source.module is None:
        raise UserError(f"{source.name} is not a torch model; ONNX export needs one (an ONNX file is already ONNX)")
    module = source.module.eval().to("cpu")
    size, fixed = source.input_size, source.fixed_batch
    example = torch.rand(fixed or 2, 3, size, size)
    # the exporter narrates on stdout; keep stdout clean for --json
    try:
        with _quiet(), torch.inference_mode(False):
            if isinstance(module, torch.jit.ScriptModule):  # the dynamo exporter cannot trace TorchScript
                import tempfile

                import warnings

                with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the legacy exporter warns that it is legacy, at length
                    torch.onnx.export(module, (example,), f"{tmp}/m.onnx", dynamo=False, opset_version=OPSET,
                                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                      dynamic_axes=None if fixed else {INPUT_NAME: {0: "batch"},
                                                                        OUTPUT_NAME: {0: "batch"}})
                    proto = onnx.load(f"{tmp}/m.onnx")
            else:
                program = torch.onnx.export(
                    module, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=None if fixed else ({0: torch.export.Dim("batch", min=1)},),
                    optimize=True, verbose=False)
                proto = program.model_proto
    except UserError:
        raise
    except Exception as exc:  # the exporters raise many types for an op or a control flow they cannot trace
        raise UserError(f"cannot export {source.name} to ONNX: {_reason(exc)}; use --backend torch") from None
    set_metadata(proto, model_metadata(source))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001  (the exporter wrote a graph its own checker refuses: ceil-mode pools)
        raise UserError(f"cannot export {source.name} to ONNX: the exported graph fails ONNX's checker "
                        f"({_reason(exc)}); use --backend torch") from None
    return proto


@contextlib.contextmanager
def _quiet():
    """The exporters' own output, none of which is the user's business when cifarbench says in one line whether
    the export worked: stdout and stderr narration, Python warnings, and torch's logging (a failed torch.export
    logs tracebacks and whole graphs at WARNING and ERROR level through handlers bound to the real stderr)."""
    import logging
    import warnings

    previous = logging.root.manager.disable
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


def _reason(exc: BaseException) -> str:
    """Why an export failed, in one line: the innermost cause's first line (torch.onnx wraps the reason in
    "Failed to export the model with torch.export. This is step 1/3 ..."), without terminal colour codes."""
    import re

    while exc.__cause__ is not None and exc.__cause__ is not exc:
        exc = exc.__cause__
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def export_onnx(model, out: str | Path) -> Path:
    """Write ``model`` as ONNX at ``out``: a torch source is exported, an ONNX source is copied with cifarbench's
    metadata (its contract: classes, mean/std, input size) added."""
    import onnx

    out = Path(out)
    source = as_source(model)
    if source.kind == "onnx":
        proto = load_onnx(source.onnx_path)
        set_metadata(proto, {**model_metadata(source), "precision": graph_precision(proto)})
    else:
        proto = to_onnx_proto(source)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    return out
