"""What every output says about how it was made: one ``"provenance"`` block for every command's JSON.

``provenance(...)`` names the cifarbench version, the exact command line, the model (name, format and content
digest), the data (its identity, which carries a content digest for image folders and archives), the backend,
precision and device, the UTC date, and the versions of the libraries that computed the numbers. It takes what
the command already has in hand (a :class:`~cifarbench.source.ModelSource`, a runtime, a
:class:`~cifarbench.data.Dataset`) and reads attributes only, so it works with any object that has them and
imports no heavy library itself (library versions come from the installed packages' metadata).
"""
from __future__ import annotations

import datetime as _dt
import shlex
import sys
from pathlib import Path

#: distributions whose versions change numbers, in the order they are listed
LIBRARIES = ("torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy")


def version() -> str:
    from . import __version__

    return __version__


def library_versions(names=LIBRARIES) -> dict:
    """``{distribution: version}`` for those installed (read from package metadata: nothing is imported)."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def format_command(argv=None) -> str:
    """The command as a shell would take it back: ``cifarbench occlude --k 8 cat.png`` (quoted where needed)."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        # the console script is ``.../bin/cifarbench``, ``python -m cifarbench.cli`` gives ``.../cli.py``
        head = Path(str(argv[0])).name
        argv[0] = "cifarbench" if head in ("cifarbench", "cli.py", "__main__.py") else str(argv[0])
    return shlex.join(str(a) for a in argv)


def describe_model(model) -> dict | None:
    """``{"name", "kind", "digest", "path", ...}`` from a ModelSource, a runtime (its ``.source``), or a plain
    name; None when nothing is known."""
    if model is None:
        return None
    if isinstance(model, (str, Path)):
        return {"name": str(model), "kind": None, "digest": None}
    runtime = None
    source = model
    if not hasattr(model, "digest") and getattr(model, "source", None) is not None:
        runtime, source = model, model.source
    out = {"name": getattr(source, "name", None) or getattr(model, "net", None) or type(model).__name__,
           "kind": getattr(source, "kind", None), "digest": getattr(source, "digest", None)}
    path = getattr(source, "path", None)
    if path is not None:
        out["path"] = str(path)
    prov = getattr(source, "provenance", None)
    if isinstance(prov, dict) and prov:
        out["source"] = dict(prov)
    if runtime is not None and getattr(runtime, "onnx_path", None) is not None:
        try:
            onnx = runtime.onnx_path()
        except Exception:  # a capability query must not break the provenance of a result already computed
            onnx = None
        if onnx is not None:
            out["artifact"] = str(onnx)
    return out


def describe_data(data) -> dict | None:
    """``{"identity", "images", "classes"}`` from a Dataset, or ``{"identity": data}`` for a plain string."""
    if data is None:
        return None
    if isinstance(data, (str, Path)):
        return {"identity": str(data)}
    if isinstance(data, dict):
        return dict(data)
    out = {"identity": getattr(data, "identity", None)}
    try:
        out["images"] = len(data)
    except TypeError:
        pass
    classes = getattr(data, "classes", None)
    if classes is not None:
        out["classes"] = len(classes)
    missing = getattr(data, "missing_classes", None)
    if missing:
        out["missing_classes"] = list(missing)
    return out


def provenance(command_line=None, model=None, data=None, backend=None, precision=None, device=None,
               extra=None) -> dict:
    """The provenance block every JSON output embeds under ``"provenance"``.

    ``command_line``: a string or an argv list (default: this process's ``sys.argv``). ``model``: a ModelSource,
    a runtime (its ``.source`` is used; its ``.name``, ``.precision`` and ``.device`` fill ``backend``,
    ``precision`` and ``device`` when those are not given), or a name. ``data``: a Dataset, an identity string
    or a dict. ``extra``: more JSON-ready facts, merged last (e.g. ``{"filters": "conv1:0,1"}``).
    """
    if command_line is None or not isinstance(command_line, str):
        command_line = format_command(command_line)
    runtime = model if model is not None and getattr(model, "source", None) is not None else None
    if runtime is not None:
        backend = backend if backend is not None else getattr(runtime, "name", None)
        precision = precision if precision is not None else getattr(runtime, "precision", None)
        device = device if device is not None else getattr(runtime, "device", None)
    out = {
        "cifarbench": version(),
        "command": command_line,
        "model": describe_model(model),
        "data": describe_data(data),
        "backend": backend,
        "precision": precision,
        "device": str(device) if device is not None else None,
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "python": sys.version.split()[0],
        "libraries": library_versions(),
    }
    if extra:
        out.update(extra)
    return out


def data_label(identity) -> str:
    """A data identity as a title names it, in words that wrap: ``imagefolder:cifar10-jpeg75.tar.gz:3dfec350…:test``
    reads ``cifar10-jpeg75.tar.gz test (3dfec350)``, ``synthetic:200:test`` reads ``synthetic:200 test``."""
    import re

    parts = str(identity).split(":")
    if len(parts) >= 4 and re.fullmatch(r"[0-9a-f]{8,}", parts[-2]):
        return f"{':'.join(parts[1:-2])} {parts[-1]} ({parts[-2][:8]})"
    return f"{':'.join(parts[:-1])} {parts[-1]}" if len(parts) >= 2 else str(identity)


def caption(prov: dict, changed: str | None = None) -> str:
    """One line for a figure: ``net1 (a1b2c3d4) · cifar10:test · torch fp32 cpu · <what changed>``."""
    model = prov.get("model") or {}
    parts = []
    if model.get("name"):
        digest = model.get("digest")
        parts.append(f"{model['name']} ({digest[:8]})" if digest else model["name"])
    data = prov.get("data") or {}
    if data.get("identity"):
        parts.append(str(data["identity"]))
    run = " ".join(str(prov[k]) for k in ("backend", "precision", "device") if prov.get(k))
    if run:
        parts.append(run)
    if changed:
        parts.append(changed)
    return " · ".join(parts)
