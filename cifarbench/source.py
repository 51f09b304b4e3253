"""Model sources, resolved once: whatever names a classifier becomes a :class:`ModelSource`.

``resolve_source(spec, *, arch=None, arch_kw=None, mean=None, std=None, classes=None, input_size=None)`` takes

- a zoo name (bundled weights) or a cifarbench checkpoint (``.safetensors`` with cifarbench metadata, or a run
  folder holding ``best.safetensors``);
- any ``torch.nn.Module`` (API), or an in-memory ``torch.export.ExportedProgram``;
- a TorchScript file (``torch.jit.save``), a ``torch.export.save`` ExportedProgram ``.pt2`` and an AOTInductor
  package ``.pt2``, told apart by their zip listing, not their suffix;
- a state_dict (``.pt``/``.pth`` from ``torch.save(model.state_dict())``, or ``.safetensors`` without cifarbench
  metadata) together with ``arch="PKG.MODULE:FACTORY"`` (``--arch``) and ``arch_kw`` (``--arch-kw key=value``);
- any ONNX file: either exporter, external data or not, dynamic or fixed batch, cifarbench metadata or not;

and returns the source with the input contract every analysis needs: the square input size S and class count C
read from the model (the ONNX graph's shapes, or one probe forward of a zeros [B, 3, S, S] batch), the class names,
the normalization the model does *not* do itself (``mean``/``std``: cifarbench applies it, in
:meth:`ModelSource.normalize`, the one home of that fact for user models), a content digest and provenance.
Every analysis takes [0, 1] RGB pixels, NCHW; ``source.torch_module()`` is a module that does too.

What opening each format can run (recorded as ``provenance["runs_code"]`` and ``provenance["executes"]``):

==================  ============  ==============================================================================
format              runs code?    why
==================  ============  ==============================================================================
zoo / checkpoint    no            safetensors: raw tensors and a JSON header
state_dict .pt      no (file)     ``torch.load(weights_only=True)``: only tensors and plain containers unpickle;
                                  a whole pickled model (``torch.save(model)``) is refused, never unpickled
state_dict + arch   **yes**       ``--arch`` imports the named Python module and calls the factory: the user's code
TorchScript         no Python     TorchScript code runs in torch's own interpreter (torch operators only; no
                                  Python, no native code from the file)
ExportedProgram     no            a graph of registered torch operators. ``torch.export.load`` falls back to
                                  ``torch.load(weights_only=False)`` for pickled payloads, so an archive holding
                                  any pickled payload that ``weights_only=True`` cannot read is refused first
AOTInductor .pt2    **yes**       the package's shared library (native code) is loaded into this process
ONNX                no            a graph of ONNX operators run by onnxruntime; external data must lie in the
                                  model's folder (a location that leaves it is refused)
==================  ============  ==============================================================================

The CLI passes ``--arch`` module names relative to the working directory (it is put on ``sys.path``, as uvicorn
and gunicorn do for ``module:attr`` specs), or a ``path/to/file.py:factory``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import zipfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .errors import UserError, warn

KINDS = ("zoo", "checkpoint", "module", "torchscript", "exported-program", "aoti", "onnx", "state-dict", "tensorrt")
#: the ``metadata_props`` prefix of cifarbench's ONNX files (the same as ``cifarbench.export.onnx.META_PREFIX``)
META_PREFIX = "cifarbench."
DEFAULT_INPUT_SIZE = 32
#: the probe and every batch allocate [B, 3, S, S] floats; past this a "CIFAR-style" model is a typo
MAX_INPUT_SIZE = 1024
#: a classes file is a short list of names; anything larger is the wrong file
MAX_CLASSES_FILE = 1 << 20
ACCEPTED = ("a zoo name, a cifarbench checkpoint (.safetensors or run folder), a TorchScript file, "
            "a torch.export .pt2, an AOTInductor .pt2, an ONNX file, or a state_dict (.pt/.pth/.safetensors) "
            "with --arch PKG.MODULE:FACTORY")


@dataclass(frozen=True, eq=False)
class ModelSource:
    """A classifier and its input contract. Build it with :func:`resolve_source`.

    ``module``: an eval-mode ``torch.nn.Module`` taking the model's *own* input (normalized when ``mean`` is set),
    or None for ONNX- and AOTI-only sources. ``onnx_path``: the ONNX file (external data beside it), else None.
    ``path``: the file the source came from (any format), None for an in-memory module. ``input_size``: S, images
    are 3 x S x S. ``fixed_batch``: the only batch size the graph accepts (a fixed-batch ONNX or ExportedProgram),
    else None. ``mean``/``std``: the per-channel normalization cifarbench must apply to [0, 1] pixels before the
    model (None: the model takes [0, 1] pixels, e.g. the zoo nets, which normalize inside). ``digest``: sha256 of
    the content (see :func:`resolve_source`). ``provenance``: JSON-ready facts (path, format, runs_code, executes,
    arch, ...). ``metadata``: cifarbench's metadata from the checkpoint or ONNX file, else empty.
    """

    kind: str
    name: str
    module: Any
    onnx_path: Path | None
    input_size: int
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    digest: str
    provenance: dict = field(default_factory=dict)
    path: Path | None = None
    fixed_batch: int | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def normalized_inside(self) -> bool:
        """True when the model takes [0, 1] pixels as they are (nothing for cifarbench to apply)."""
        return self.mean is None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.input_size, self.input_size)

    def normalize(self, x):
        """The model's input for a [0, 1] batch ``x`` [N, 3, S, S]: ``(x - mean) / std`` per channel, or ``x``."""
        if self.mean is None:
            return x
        import torch

        if x.ndim != 4 or x.shape[1] != 3:
            raise UserError(f"{self.name} takes [N, 3, {self.input_size}, {self.input_size}] batches, "
                            f"got {list(x.shape)}")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def torch_module(self):
        """A module taking [0, 1] pixels: ``module`` itself, or ``module`` behind :meth:`normalize` (a
        :class:`NormalizedModel`, whose ``.model`` is ``module``: the same object, so hooks on ``module``'s layers
        fire and layer names are ``module``'s own). Not a copy: deep-copy it before editing weights."""
        if self.module is None:
            what = "an ONNX file" if self.kind == "onnx" else "an AOTInductor package"
            raise UserError(f"{self.name} is {what}, not a torch module; use an ONNX Runtime "
                            f"{'or TensorRT ' if self.kind == 'onnx' else 'AOTInductor '}backend for it")
        if self.mean is None:
            return self.module
        return _classes().NormalizedModel(self.module, self.mean, self.std)

    def describe(self) -> dict:
        """Everything but the module, JSON-ready (for ``--json`` outputs and reports)."""
        return {"kind": self.kind, "name": self.name, "path": str(self.path) if self.path else None,
                "onnx_path": str(self.onnx_path) if self.onnx_path else None, "input_size": self.input_size,
                "fixed_batch": self.fixed_batch, "num_classes": self.num_classes, "classes": list(self.classes),
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "digest": self.digest, "provenance": self.provenance}


@cache
def _classes():
    """The two wrapper modules, defined on first use so importing this module does not import torch."""
    import torch
    from torch import nn

    class NormalizedModel(nn.Module):
        """``model((x - mean) / std)``: a model that expects normalized input, fed [0, 1] pixels."""

        def __init__(self, model: nn.Module, mean, std):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, x):
            return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    class ExportedModule(nn.Module):
        """An ExportedProgram's module. ``ep.module().eval()`` raises (the train/eval mode is baked in at export
        time), so ``train()``/``eval()`` here only set the flag and never reach the graph module."""

        def __init__(self, program_module: nn.Module):
            super().__init__()
            self.program = program_module

        def train(self, mode: bool = True):
            self.training = mode
            return self

        def forward(self, x):
            return self.program(x)

    return type("_Classes", (), {"NormalizedModel": NormalizedModel, "ExportedModule": ExportedModule})


# ---------------------------------------------------------------------------------------------------- parsing


def parse_triple(value, what: str) -> tuple[float, float, float] | None:
    """``"R,G,B"`` or three numbers -> a float triple; None stays None."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        triple = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UserError(f"--{what} takes three numbers R,G,B (e.g. --{what} 0.485,0.456,0.406), "
                        f"got {value!r}") from None
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise UserError(f"--{what} takes three finite numbers R,G,B (e.g. --{what} 0.485,0.456,0.406), "
                        f"got {value!r}")
    return triple


#: the smallest --std: pixels in [0, 1] divided by it stay far inside float32's range
MIN_STD = 1e-6


def parse_contract(mean, std) -> tuple[tuple | None, tuple | None]:
    mean, std = parse_triple(mean, "mean"), parse_triple(std, "std")
    if (mean is None) != (std is None):
        raise UserError("give --mean and --std together (for a model that only scales, use --mean 0,0,0)")
    if std is not None and not all(v >= MIN_STD for v in std):
        # (x - mean) / std must stay finite in float32: 1e-45 is positive, and overflows every pixel to infinity
        raise UserError(f"--std takes three numbers of at least {MIN_STD:g}, got {','.join(map(str, std))}")
    if mean is not None and (max(abs(v) for v in mean) > 1.5 or max(std) > 1.5):
        # cifarbench feeds [0, 1] pixels; torchvision's 0..255-scale constants (123.7, 58.4) map every pixel to
        # about -2 and give a model of saturated images, a mistake that runs without any error
        warn(f"--mean {','.join(map(str, mean))} --std {','.join(map(str, std))} look like 0..255-scale values; "
             f"cifarbench's pixels are in [0, 1], so 0..1-scale values (e.g. 0.485,0.456,0.406 and "
             f"0.229,0.224,0.225) are usual")
    return mean, std


def parse_arch_kw(items) -> dict:
    """``["depth=20", "width=0.5", "pretrained=false"]`` (``--arch-kw``, repeatable or comma-separated) -> a
    dict; values become int, float, bool or None when they read as one, else stay strings."""
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    if isinstance(items, str):
        items = [items]
    out = {}
    for item in items:
        for part in str(item).split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or not key.isidentifier():
                raise UserError(f"--arch-kw takes key=value (e.g. --arch-kw num_classes=10), got {part!r}")
            out[key] = _parse_value(value.strip())
    return out


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_classes(value) -> tuple[str, ...] | None:
    """A list of names, ``"a,b,c"``, or a path to a file with one name per line -> a tuple of names."""
    if value is None:
        return None
    if isinstance(value, Path) or (isinstance(value, str) and "," not in value
                                   and (os.sep in value or value.endswith(".txt") or Path(value).is_file())):
        path = Path(value)
        if not path.is_file():
            raise UserError(f"no such classes file: {path} (give a file with one name per line, or a,b,c)")
        if path.stat().st_size > MAX_CLASSES_FILE:
            raise UserError(f"{path} is too large to be a classes file ({path.stat().st_size} bytes)")
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise UserError(f"{path} is not a UTF-8 text file of class names") from None
        names = [n for n in names if n]
    elif isinstance(value, str):
        names = [n.strip() for n in value.split(",")]
    else:
        if isinstance(value, (set, frozenset, dict)) or type(value).__name__ in ("dict_keys", "dict_values"):
            # names are bound to outputs by position: a set's order is its hash order, different per run
            raise UserError(f"class names must be in the model's output order (a list or tuple), got a "
                            f"{type(value).__name__}")
        names = [str(n).strip() for n in value]
    if not names or any(not n for n in names):
        raise UserError(f"class names must be non-empty, got {value!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"class names repeat: {', '.join(dupes[:5])}")
    return tuple(names)


def default_classes(n: int) -> tuple[str, ...]:
    from .data import CLASSES

    return tuple(CLASSES) if n == len(CLASSES) else tuple(f"class{i}" for i in range(n))


# ---------------------------------------------------------------------------------------------------- digests


def file_digest(*paths: Path) -> str:
    """sha256 over the bytes of ``paths`` in order (an ONNX file, then its external data files)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def code_digest(module, files=()) -> str:
    """sha256 of the code a module runs that is not torch's: the source file of every class in its module tree
    (and their base classes), plus ``files``; a class with no file (defined in a notebook cell) counts by its
    source text where Python has it. Editing a model's ``forward`` or a helper in its file changes the digest,
    so an artifact compiled from the old code is never reused for the new."""
    import inspect

    texts: dict[str, bytes] = {}
    for path in files:
        texts[str(Path(path).resolve())] = Path(path).read_bytes()
    for cls in {klass for sub in module.modules() for klass in type(sub).__mro__}:
        if cls.__module__.split(".")[0] in ("torch", "builtins", "torchvision", "timm"):
            continue  # the libraries' own code: their versions key the caches
        try:
            where = inspect.getsourcefile(cls)
        except TypeError:  # a builtin or extension class
            continue
        except OSError:  # a class in __main__ with no file (python -c, some notebooks)
            where = None
        if where and Path(where).is_file():
            key = str(Path(where).resolve())
            try:
                if key not in texts:
                    texts[key] = Path(where).read_bytes()
                continue
            except OSError:
                pass
        name = f"{cls.__module__}.{cls.__qualname__}"
        try:
            texts[name] = inspect.getsource(cls).encode()
        except (OSError, TypeError):  # no source anywhere: the class's name is all there is to go by
            texts[name] = name.encode()
    h = hashlib.sha256()
    for key in sorted(texts):  # by path, so the digest does not depend on the set's order
        h.update(hashlib.sha256(texts[key]).digest())
    return h.hexdigest()


def module_digest(module) -> str:
    """sha256 of a module's class, its ``repr`` (layer types and settings such as ReLU vs ReLU6, strides), the
    code it runs (:func:`code_digest`) and every state_dict entry's name, dtype, shape and bytes."""
    import torch

    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}".encode())
    h.update(bytes.fromhex(code_digest(module)))
    for key, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach().to("cpu").contiguous()
        h.update(f"\n{key}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- resolving


@dataclass
class _Loaded:
    """What a format loader found, before the contract is settled."""

    kind: str
    name: str
    module: Any = None
    onnx_path: Path | None = None
    path: Path | None = None
    digest: str = ""
    provenance: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    fixed_batch: int | None = None
    size: int | None = None  # read from a graph
    num_classes: int | None = None  # read from a graph
    normalizes_inside: bool = False  # a zoo net (or an export of one): (x - 0.5) / 0.5 is in the model
    probe: Any = None  # callable(batch) -> logits, for sources without a module (AOTI)


def resolve_source(spec, *, arch: str | None = None, arch_kw=None, mean=None, std=None, classes=None,
                   input_size: int | None = None) -> ModelSource:
    """The :class:`ModelSource` for ``spec`` (a zoo name, a path, an ``nn.Module`` or an ExportedProgram).

    ``arch``/``arch_kw``: the factory for a state_dict file (required there, refused elsewhere). ``mean``/``std``:
    three numbers each (or ``"R,G,B"``), the normalization the model expects on [0, 1] pixels; default: from
    cifarbench's metadata, else none. ``classes``: names (list, ``"a,b,c"`` or a file path); default: metadata,
    else CIFAR-10's for 10 outputs, else ``class0..``. ``input_size``: S for a torch model whose size cannot be
    read from a graph (default 32); checked against the graph where there is one.

    ``digest``: sha256 of the file's bytes (an ONNX file followed by its external data files in sorted order; a
    state_dict followed by ``arch`` and ``arch_kw``), or :func:`module_digest` of an in-memory module. Every
    mistake is a :class:`UserError` with one line that says what to do instead.
    """
    if isinstance(spec, ModelSource):
        if any(v is not None for v in (arch, arch_kw, mean, std, classes, input_size)):
            raise UserError(f"{spec.name} is already resolved; pass arch/mean/std/classes/input_size to "
                            f"resolve_source with the original model instead")
        return spec
    mean, std = parse_contract(mean, std)
    names = parse_classes(classes)
    kw = parse_arch_kw(arch_kw)
    if kw and not arch:
        raise UserError("--arch-kw needs --arch PKG.MODULE:FACTORY")
    if input_size is not None:
        import numbers

        if isinstance(input_size, numbers.Integral) and not isinstance(input_size, bool):
            input_size = int(input_size)  # numpy's integers too
        if isinstance(input_size, bool) or not isinstance(input_size, int) or not 1 <= input_size <= MAX_INPUT_SIZE:
            raise UserError(f"input size must be an integer in 1..{MAX_INPUT_SIZE}, got {input_size!r}")
    loaded = _load(spec, arch, kw)
    return _finish(loaded, mean, std, names, input_size)


def _load(spec, arch: str | None, kw: dict) -> _Loaded:
    import torch

    if isinstance(spec, torch.nn.Module):
        _no_arch(arch, "a torch module")
        return _from_module(spec)
    if isinstance(spec, torch.export.ExportedProgram):
        _no_arch(arch, "an ExportedProgram")
        return _from_program(spec, None)
    if not isinstance(spec, (str, Path)):
        raise UserError(f"a model is {ACCEPTED}; got a {type(spec).__name__}")
    from .zoo import list_models

    text = str(spec)
    if isinstance(spec, str) and text in list_models():
        _no_arch(arch, f"the zoo net {text}")
        return _from_zoo(text)
    path = Path(text)
    if path.is_dir():
        if not (path / "best.safetensors").is_file():
            raise UserError(f"{path} is a folder without best.safetensors; give a model file or a training run "
                            f"folder")
        path = path / "best.safetensors"
    if not path.is_file():
        raise UserError(f"no such net or checkpoint: {text} (not a model file here; known nets: "
                        f"{', '.join(list_models())})")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        _no_arch(arch, "an ONNX file")
        return _from_onnx(path)
    if suffix == ".safetensors":
        return _from_safetensors(path, arch, kw)
    if zipfile.is_zipfile(path):
        return _from_zip(path, arch, kw)
    if suffix == ".pt2":  # both .pt2 formats (torch.export, AOTInductor) are zip archives
        raise UserError(f"corrupt or unreadable .pt2 file {path}: not a zip archive (a torch.export program or an "
                        f"AOTInductor package is one); re-export it")
    # not a zip: torch.save's legacy (pre-1.6) format, or not a model at all
    return _from_state_dict_file(path, arch, kw, legacy=True)


def _no_arch(arch, what: str) -> None:
    if arch:
        raise UserError(f"--arch is only for state_dict files (.pt/.pth/.safetensors without cifarbench "
                        f"metadata); drop it for {what}")


def _from_module(module) -> _Loaded:
    import copy

    import torch

    from .nets import CifarNet

    floats = [t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    # ep.module() replaces train()/eval() on the instance (they raise: its mode was fixed when it was exported)
    fixed_mode = "eval" in vars(module) or "train" in vars(module)
    # the source owns a copy: the runtimes and engines put it in eval mode, float32, channels-last and on their
    # device, and the caller's module stays as it was (a notebook that goes on training it is not changed behind
    # its back); one copy here, none further down. An exported module is not copied: a copy loses the train()
    # and eval() that say so (and it has no mode to change)
    try:
        module = module if fixed_mode else copy.deepcopy(module)
    except Exception as exc:  # noqa: BLE001  (a module holding something deepcopy cannot copy: a lock, a handle)
        # running the caller's own object would change it (eval mode, float32, channels-last weights, a device)
        raise UserError(f"{type(module).__name__} cannot be copied ({type(exc).__name__}: "
                        f"{str(exc)[:100]}); cifarbench runs a copy so that your module is never changed: make it "
                        f"deep-copyable (move the attribute that is not out of the module)") from None
    if any(d != torch.float32 for d in floats):
        module = module.float()
    try:
        module.eval()
    except NotImplementedError:  # ep.module() refuses eval(); its mode was fixed when it was exported
        inputs = [n for n in module.graph.nodes if n.op == "placeholder"]
        fixed, size = _placeholder_dims(inputs[0], "the exported module") if len(inputs) == 1 else (None, None)
        module = _classes().ExportedModule(module)
        return _Loaded("module", "ExportedModule", module=module, digest=module_digest(module), fixed_batch=fixed,
                       size=size, provenance=_prov(None, "torch.export module (in memory)", False,
                                                   "nothing: the module was given in Python"))
    if isinstance(module, CifarNet):
        return _Loaded("module", module.name, module=module, digest=module_digest(module), size=32, num_classes=10,
                       normalizes_inside=True, provenance=_prov(None, "cifarbench net (in memory)", False,
                                                                "nothing: the module was given in Python"))
    return _Loaded("module", type(module).__name__, module=module, digest=module_digest(module),
                   provenance=_prov(None, "torch.nn.Module (in memory)", False,
                                    "nothing: the module was given in Python"))


def _prov(path, fmt: str, runs_code: bool, executes: str, **extra) -> dict:
    return {"path": str(path) if path else None, "format": fmt, "runs_code": runs_code, "executes": executes,
            **extra}


def _from_zoo(name: str) -> _Loaded:
    from .nets import IMAGE_SIZE, NUM_CLASSES
    from .zoo import load_model

    model = load_model(name)
    path = Path(model.source)
    return _Loaded("zoo", name, module=model, path=path, digest=file_digest(path), metadata=dict(model.meta),
                   size=IMAGE_SIZE, num_classes=NUM_CLASSES, normalizes_inside=True,
                   provenance=_prov(path, "cifarbench bundled weights (safetensors)", False,
                                    "nothing: raw tensors and a JSON header"))


def _from_checkpoint(path: Path) -> _Loaded:
    from .nets import IMAGE_SIZE, NUM_CLASSES
    from .zoo import load_model

    model = load_model(path)
    return _Loaded("checkpoint", model.name, module=model, path=path, digest=file_digest(path),
                   metadata=dict(model.meta), size=IMAGE_SIZE, num_classes=NUM_CLASSES, normalizes_inside=True,
                   provenance=_prov(path, "cifarbench checkpoint (safetensors)", False,
                                    "nothing: raw tensors and a JSON header"))


def _from_safetensors(path: Path, arch, kw) -> _Loaded:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"corrupt or unreadable safetensors file {path}: {str(exc).splitlines()[0][:200]}") from None
    if "cifarbench" in meta:
        _no_arch(arch, "a cifarbench checkpoint")
        return _from_checkpoint(path)
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"corrupt or unreadable safetensors file {path}: {str(exc).splitlines()[0][:200]}") from None
    return _with_arch(path, state, arch, kw, "state_dict (safetensors)", "raw tensors and a JSON header")


# zip listings (first path component stripped): what each torch format writes (checked against torch 2.14)
def _zip_kind(names: list[str]) -> str | None:
    inner = [n.split("/", 1)[1] if "/" in n else n for n in names]
    if any(n.startswith("data/aotinductor/") or n.endswith((".so", ".cpp", ".dll", ".dylib", ".pyd"))
           for n in inner):
        return "aoti"
    if any(n.startswith("models/") and n.endswith(".json") for n in inner) or \
            "serialized_exported_program.json" in inner:
        return "exported-program"
    if "constants.pkl" in inner or any(n.startswith("code/") for n in inner):
        return "torchscript"
    if "data.pkl" in inner:
        return "pickle"
    return None


def _from_zip(path: Path, arch, kw) -> _Loaded:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"corrupt or unreadable model file {path}: {exc}") from None
    kind = _zip_kind(names)
    if kind == "pickle":
        return _from_state_dict_file(path, arch, kw, legacy=False)
    if kind is None:
        raise UserError(f"{path} is a zip archive but no model format cifarbench knows; give {ACCEPTED}")
    _no_arch(arch, f"a {kind} file")
    if kind == "torchscript":
        return _from_torchscript(path)
    if kind == "exported-program":
        _check_program_archive(path)
        import torch

        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # a truncated or foreign-version archive: unusable here, whatever the type
            raise UserError(f"corrupt or incompatible torch.export program {path}: "
                            f"{str(exc).strip().splitlines()[0][:200]}") from None
        return _from_program(program, path)
    if path.suffix.lower() != ".pt2":
        # torch's C++ loader would extract and dlopen the package's library whatever the name: a "weights.pt"
        # must never run native code; the .pt2 name is the user's statement that it is a package (see PT2_WARNING)
        raise UserError(f"{path} is an AOTInductor package (a shared library: opening it runs native code), not "
                        f"the weights its name suggests; if you built it or trust it, rename it to .pt2")
    return _from_aoti(path)


def _from_torchscript(path: Path) -> _Loaded:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch 2.14 calls TorchScript deprecated on every load
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError for any bad archive
        raise UserError(f"corrupt or incompatible TorchScript file {path}: "
                        f"{str(exc).strip().splitlines()[0][:200]}") from None
    return _Loaded("torchscript", path.stem, module=module.eval(), path=path, digest=file_digest(path),
                   provenance=_prov(path, "TorchScript", False,
                                    "TorchScript code in torch's interpreter (torch operators only, no Python)"))


#: the payloads a plain-tensor ExportedProgram archive holds (torch.export.pt2_archive.constants): weights and
#: tensor constants, raw bytes read by ``torch.as_strided``. torch also reads ``custom_obj_*`` (torchbind's
#: pickler) and ``opaque_obj_*`` (plain ``pickle.loads``) constants, and ``use_pickle`` payloads with
#: ``weights_only=False``: each can run code, so only these prefixes pass (an allow-list: a prefix a later torch
#: adds is refused, not trusted)
_PROGRAM_PAYLOADS = {"data/weights/": "weight_", "data/constants/": "tensor_"}


def _check_program_archive(path: Path) -> None:
    """Refuse an ExportedProgram archive that ``torch.export.load`` would unpickle: a payload config entry that is
    not a raw weight or tensor constant (``use_pickle``, ``custom_obj_*``, ``opaque_obj_*``, anything else), a
    payload member of another kind, and legacy ``.pt`` members that ``weights_only=True`` cannot read."""
    import io

    import torch

    def refuse(what: str):
        raise UserError(f"{path} holds {what}, which torch.export.load unpickles and which can run code; "
                        f"re-export the model with plain tensors only, or export it to ONNX")

    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            inner = info.filename.split("/", 1)[-1]
            folder = next((f for f in _PROGRAM_PAYLOADS if inner.startswith(f)), None)
            if inner.startswith("data/") and inner.endswith("_config.json"):
                try:
                    config = json.loads(z.read(info)).get("config", {})
                    entries = list(config.items())
                except (ValueError, AttributeError):
                    raise UserError(f"corrupt torch.export program {path}: bad {inner}") from None
                prefix = "weight_" if "weights" in inner else "tensor_"
                for fqn, entry in entries:
                    if not isinstance(entry, dict):
                        raise UserError(f"corrupt torch.export program {path}: bad {inner}")
                    name = str(entry.get("path_name", ""))
                    if entry.get("use_pickle"):
                        refuse(f"a pickled payload ({fqn}: {name}, e.g. a tensor subclass, read with "
                               f"weights_only=False)")
                    if not name.startswith(prefix):
                        refuse(f"a payload that is not a plain tensor ({fqn}: {name})")
            elif inner.endswith(".pt"):
                try:
                    torch.load(io.BytesIO(z.read(info)), map_location="cpu", weights_only=True)
                except Exception:
                    raise UserError(f"{path} holds a pickled object ({inner}) that only weights_only=False can "
                                    f"read, which can run code; re-export it, or export to ONNX") from None
            elif folder is not None and inner != folder and not inner[len(folder):].startswith(
                    _PROGRAM_PAYLOADS[folder]):
                refuse(f"a payload that is not a plain tensor ({inner})")


def _from_program(program, path: Path | None) -> _Loaded:
    """An ExportedProgram: shapes from its input placeholder (a static batch is a fixed batch)."""
    users = list(program.graph_signature.user_inputs)
    if len(users) != 1:
        raise UserError(f"the exported program takes {len(users)} inputs; cifarbench feeds one image batch")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == users[0])
    fixed, size = _placeholder_dims(node, "the exported program")
    try:
        module = _classes().ExportedModule(program.module())
    except Exception as exc:  # constants that do not fit its graph, a foreign-version program: unusable here
        where = f" {path}" if path is not None else ""
        raise UserError(f"corrupt or incompatible torch.export program{where}: "
                        f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}") from None
    if path is None:
        return _Loaded("exported-program", "ExportedProgram", module=module, digest=module_digest(module),
                       fixed_batch=fixed, size=size,
                       provenance=_prov(None, "torch.export ExportedProgram (in memory)", False,
                                        "nothing: the program was given in Python"))
    return _Loaded("exported-program", path.stem, module=module, path=path, digest=file_digest(path),
                   fixed_batch=fixed, size=size,
                   provenance=_prov(path, "torch.export ExportedProgram (.pt2)", False,
                                    "a graph of registered torch operators; pickled payloads refused"))


def _placeholder_dims(node, what: str) -> tuple[int | None, int | None]:
    """(fixed batch, square size) of a traced graph's input placeholder; None where the dim is symbolic."""
    import torch

    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None, None
    shape = list(val.shape)
    if len(shape) != 4:
        raise UserError(f"{what} takes {len(shape)}-d input; cifarbench feeds [N, 3, S, S]")
    static = [d if isinstance(d, int) else None for d in shape]
    _check_layout(static, what)
    return static[0], static[2] if static[2] is not None and static[2] == static[3] else None


def _check_layout(static: list, what: str) -> None:
    """[N, C, H, W] with C = 3 and H = W where the graph fixes them; NHWC named as such."""
    _, c, h, w = static
    if c is not None and c != 3:
        if static[3] == 3:
            raise UserError(f"{what} takes NHWC input {static}; cifarbench feeds NCHW [N, 3, S, S] — re-export "
                            f"the model with channels first")
        raise UserError(f"{what} takes {c}-channel input; cifarbench feeds RGB [N, 3, S, S]")
    if h is not None and w is not None and h != w:
        raise UserError(f"{what} takes {h}x{w} images; cifarbench runs square S x S images")


def _from_aoti(path: Path) -> _Loaded:
    import torch

    dims = _aoti_input_dims(path)  # before loading: a package for another layout never runs here
    if dims is not None:
        _check_layout(dims, str(path))
    try:
        package = torch._inductor.aoti_load_package(str(path))
        raw = package.get_metadata()
    except Exception as exc:  # a bad zip, a missing .so, an ABI or device mismatch: unusable here
        raise UserError(f"corrupt or incompatible AOTInductor package {path} (wrong device or torch version?): "
                        f"{str(exc).strip().splitlines()[0][:200]}") from None
    meta = {k[len(META_PREFIX):]: v for k, v in raw.items() if k.startswith(META_PREFIX)}
    zoo = "spec" in meta
    fixed, size = (dims[0], dims[2] if dims[2] == dims[3] else None) if dims else (None, None)
    return _Loaded("aoti", meta.get("net") or path.stem, path=path, digest=file_digest(path), metadata=meta,
                   fixed_batch=fixed,
                   size=size or (int(meta["input_size"]) if "input_size" in meta else (32 if zoo else None)),
                   num_classes=int(meta["num_classes"]) if "num_classes" in meta else (10 if zoo else None),
                   normalizes_inside=zoo, probe=lambda batch: package(batch),
                   provenance=_prov(path, "AOTInductor package (.pt2)", True,
                                    "native code: the package's shared library is loaded into this process"))


def _aoti_input_dims(path: Path) -> list | None:
    """The input's static dims ([N, C, H, W], None where dynamic) from the package's generated C++.

    An AOTInductor model checks its input's shape only when ``AOTI_RUNTIME_CHECK_INPUTS`` is set; otherwise a
    batch of another shape is read out of bounds. The wrapper's ``check_input_0`` states the expected dims
    (``if (2 != arg4_1_size[0])``), so a fixed batch is known before the package ever runs. None when the package
    ships no wrapper source."""
    with zipfile.ZipFile(path) as z:
        wrappers = [i for i in z.infolist() if i.filename.endswith(".wrapper.cpp") and i.file_size < 64 << 20]
        if not wrappers:
            return None
        text = z.read(wrappers[0]).decode("utf-8", "replace")
    start = text.find("check_input_0(")
    end = text.find("\n}\n", start)
    if start < 0:
        return None
    dims: list = [None] * 4
    for value, index in re.findall(r"if \((\d+) != \w+_size\[(\d+)\]\)", text[start:end]):
        if int(index) < 4:
            dims[int(index)] = int(value)
    return dims


def _from_state_dict_file(path: Path, arch, kw, legacy: bool) -> _Loaded:
    import pickle

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=not legacy)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(f"{path} holds pickled Python objects{what}, e.g. a whole model from torch.save(model); "
                        f"loading it needs weights_only=False, which runs code from the file — save "
                        f"model.state_dict() and pass --arch PKG.MODULE:FACTORY, or save TorchScript or ONNX") \
            from None
    except Exception as exc:  # torch raises many types for a file that is not a torch.save archive
        raise UserError(f"{path} is not a model file cifarbench can read ({str(exc).strip().splitlines()[0][:120]}); "
                        f"give {ACCEPTED}") from None
    state, key = _find_state_dict(obj, path)
    return _with_arch(path, state, arch, kw, "state_dict (torch.save)" + (f", under key {key!r}" if key else ""),
                      "tensors via torch.load(weights_only=True)")


def _find_state_dict(obj, path: Path) -> tuple[dict, str | None]:
    """The tensors of a state_dict, or of a training checkpoint dict holding one under a usual key."""
    import torch

    def is_state(d):
        return isinstance(d, dict) and d and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in d.items())

    if is_state(obj):
        return obj, None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net", "weights", "ema"):
            if is_state(obj.get(key)):
                return obj[key], key
        keys = ", ".join(map(str, list(obj)[:6]))
        raise UserError(f"{path} holds a dict but no state_dict of tensors (keys: {keys}); save "
                        f"model.state_dict() with torch.save")
    raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict; save model.state_dict() with "
                    f"torch.save")


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def _with_arch(path: Path, state: dict, arch, kw: dict, fmt: str, file_executes: str) -> _Loaded:
    if not arch:
        raise UserError(f"{path} is a state_dict (weights without an architecture); name the model with "
                        f"--arch PKG.MODULE:FACTORY (a callable that builds it, e.g. --arch mypkg.models:resnet20)")
    module = build_arch(arch, kw)
    stripped = ""
    own = module.state_dict()
    # wrappers that prefix every key: DataParallel/DDP (module.), torch.compile (_orig_mod.), a Lightning
    # module holding the net as self.model (model.); stripped only where every key has it and the net's have not
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
                state, stripped, changed = {k[len(prefix):]: v for k, v in state.items()}, stripped + prefix, True
    _check_state(path, state, own, arch, kw)
    module.load_state_dict(state, strict=False)  # every key was checked above; BN counters may be absent
    module.eval()
    h = hashlib.sha256(bytes.fromhex(file_digest(path)))
    h.update(json.dumps({"arch": arch, "arch_kw": kw}, sort_keys=True, default=str).encode())
    # the weights and the --arch string do not say what forward runs: the code of the model's classes (and an
    # --arch file.py) do, so artifacts compiled from an edited model are not reused
    factory_file = str(arch).partition(":")[0]
    h.update(bytes.fromhex(code_digest(module, [factory_file] if factory_file.endswith(".py") else [])))
    return _Loaded("state-dict", path.stem, module=module, path=path, digest=h.hexdigest(),
                   provenance=_prov(path, fmt, True, f"imports and calls {arch} (--arch, your Python code); "
                                                     f"the file: {file_executes}",
                                    arch=arch, arch_kw={k: v for k, v in kw.items()},
                                    **({"stripped_prefix": stripped} if stripped else {})))


def _check_state(path: Path, state: dict, own: dict, arch: str, kw: dict) -> None:
    def few(keys):
        keys = list(keys)
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing {few(missing)}")
    if unexpected:
        problems.append(f"unexpected {few(unexpected)}")
    if shapes:
        problems.append(f"shape (file vs model) {few(shapes)}")
    if problems:
        call = f"{arch}({', '.join(f'{k}={v!r}' for k, v in kw.items())})"
        raise UserError(f"{path} does not match {call}: {'; '.join(problems)} — check --arch/--arch-kw")


def build_arch(arch: str, kw: dict | None = None):
    """``PKG.MODULE:FACTORY`` (or ``path/to/file.py:FACTORY``; FACTORY may be dotted) called with ``kw``: a fresh
    module. Imports the user's code: see the module docstring."""
    import importlib
    import importlib.util

    import torch

    kw = kw or {}
    modname, sep, attr = str(arch).partition(":")
    if not sep or not modname or not attr or ":" in attr:
        raise UserError(f"--arch takes PKG.MODULE:FACTORY (e.g. --arch mypkg.models:resnet20), got {arch!r}")
    try:
        if modname.endswith(".py"):
            file = Path(modname)
            if not file.is_file():
                raise UserError(f"--arch {arch}: no such file {file}")
            spec = importlib.util.spec_from_file_location(f"_cifarbench_arch_{file.stem}", file)
            mod = importlib.util.module_from_spec(spec)
            folder = str(file.resolve().parent)
            if folder not in sys.path:  # as `python file.py` runs it: modules beside it import
                sys.path.insert(0, folder)
            spec.loader.exec_module(mod)
        else:
            cwd = os.getcwd()
            if cwd not in sys.path and "" not in sys.path:
                sys.path.append(cwd)  # `--arch mymodels:net` from the folder holding mymodels.py, as with python -m
            mod = importlib.import_module(modname)
    except UserError:
        raise
    except ImportError as exc:
        raise UserError(f"--arch {arch}: cannot import {modname} ({exc}); install it or run from the folder "
                        f"that holds it") from None
    except Exception as exc:  # the user's module failed while importing (SyntaxError, anything it raises)
        raise UserError(f"--arch {arch}: importing {modname} failed: {type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}") from None
    factory = mod
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise UserError(f"--arch {arch}: {modname} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UserError(f"--arch {arch}: {attr} is a {type(factory).__name__}, not a callable that builds a model")
    try:
        module = factory(**kw)
    except Exception as exc:  # wrong keyword arguments or the factory's own checks: the user's call is wrong
        raise UserError(f"--arch {arch}: calling {attr}({', '.join(f'{k}={v!r}' for k, v in kw.items())}) failed: "
                        f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
                        ) from None
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"--arch {arch}: {attr}() returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def _from_onnx(path: Path) -> _Loaded:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: not an ONNX model
        raise UserError(f"corrupt or invalid ONNX model {path}: {str(exc).strip().splitlines()[0][:200]}") from None
    folder = path.parent.resolve()
    locations = set()
    for tensor in _all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in tensor.external_data}.get("location", "")
            target = (folder / loc).resolve()
            if not loc or Path(loc).is_absolute() or folder not in target.parents:
                raise UserError(f"{path} points its external data outside its folder ({loc!r}); refusing to read "
                                f"it — re-save the model with its data beside it")
            if not target.is_file():
                raise UserError(f"{path} keeps its weights in {loc}, which is missing; copy it next to {path.name}")
            locations.add(target)
    try:
        onnx.checker.check_model(str(path))  # by path: handles external data and > 2 GB models
    except Exception as exc:  # ValidationError and friends
        raise UserError(f"corrupt or invalid ONNX model {path}: {str(exc).strip().splitlines()[0][:200]}") from None
    meta = {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"{path} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); cifarbench feeds "
                        f"one image batch")
    tt = inputs[0].type.tensor_type
    if tt.elem_type != onnx.TensorProto.FLOAT:
        raise UserError(f"{path} takes {onnx.TensorProto.DataType.Name(tt.elem_type).lower()} input; cifarbench "
                        f"feeds float32 — re-export it with a float32 input")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    if len(dims) != 4:
        raise UserError(f"{path} takes {len(dims)}-d input; cifarbench feeds [N, 3, S, S]")
    _check_layout(dims, str(path))

    def shape(value) -> list:
        return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                for d in value.type.tensor_type.shape.dim]

    if len(proto.graph.output) != 1:
        # which output holds the logits is the user's knowledge: the first of (features, logits) or (probs,
        # logits) would run every analysis on the wrong tensor, and its width passes for a class count
        shown = ", ".join(f"{o.name!r} {_show_dims(shape(o))}" for o in proto.graph.output[:6])
        raise UserError(f"{path} has {len(proto.graph.output)} outputs ({shown}); cifarbench reads one, the "
                        f"logits [N, classes]: re-export the model with only its logits as output")
    out_dims = [d if isinstance(d, int) else None for d in shape(proto.graph.output[0])]
    if out_dims and len(out_dims) != 2:
        raise UserError(f"{path}: output {proto.graph.output[0].name!r} is {len(out_dims)}-d "
                        f"{_show_dims(shape(proto.graph.output[0]))}; cifarbench needs logits [N, classes]")
    zoo = "spec" in meta
    external = sorted(locations)
    fmt = "ONNX" + (f" (external data: {', '.join(p.name for p in external)})" if external else "")
    return _Loaded("onnx", meta.get("net") or path.stem, onnx_path=path, path=path,
                   digest=file_digest(path, *external), metadata=meta, fixed_batch=dims[0],
                   size=dims[2] if dims[2] is not None and dims[2] == dims[3] else None,
                   num_classes=out_dims[1] if len(out_dims) == 2 else None, normalizes_inside=zoo,
                   probe=_ort_prober(path),
                   provenance=_prov(path, fmt, False, "a graph of ONNX operators run by onnxruntime",
                                    external_data=[p.name for p in external]))


def _show_dims(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _all_tensors(proto):
    """Every TensorProto of a model: initializers and Constant attributes, subgraphs included."""
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(proto)


def _ort_prober(path: Path):
    """``probe(batch) -> logits`` on one onnxruntime session of ``path``, made on the first call."""
    session = None

    def probe(batch):
        nonlocal session
        import onnxruntime as ort
        import torch

        if session is None:
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.log_severity_level = 4  # a batch the graph refuses is an answer here, not an error to log
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0])

    return probe


#: how far one image's logits may move when the other images in its batch change (:func:`_logit_gap`: relative
#: to the row's largest logit, over the larger of 1 and their spread) before the model counts as batch-dependent:
#: kernels for other batch sizes round differently (~1e-6 in float32), a statistic over the batch moves them by
#: whole percents
BATCH_TOLERANCE = {"float32": 1e-4, "float64": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


def _probe(loaded: _Loaded, size: int) -> tuple[int, int | None, str]:
    """``(classes, fixed batch, output fingerprint)`` of a model, from running it. Checked: the output is logits
    [B, C]; an image's logits do not depend on the other images in its batch (the analyses batch images; a model
    whose output does, e.g. a BatchNorm in training mode or a statistic over dim 0, would give numbers that depend
    on how images happen to be chunked); a model that runs one image but not two (a ``reshape(1, -1)``) is taken
    as a fixed batch of one. A dark and a bright image are run together and the dark one alone (a fixed batch B:
    the dark one beside B-1 bright ones, and B copies of it)."""
    import torch

    if loaded.module is not None:
        param = next(iter(loaded.module.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

        def run(x):
            with torch.no_grad():
                return loaded.module(x.to(device, dtype))
    else:
        def run(x):
            with torch.no_grad():
                return loaded.probe(x)

    noise = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    dark, bright = noise[:1] * 0.4, 0.6 + noise[1:] * 0.4  # unlike statistics, so a batch statistic shows
    fixed = loaded.fixed_batch
    batch = torch.cat([dark, bright.expand(fixed - 1, -1, -1, -1)]) if fixed else torch.cat([dark, bright])
    try:
        out = run(batch)
    except Exception as exc:  # noqa: BLE001  (the model's own shape check: it does not take this input)
        if fixed:
            raise _does_not_run(loaded, list(batch.shape), exc) from None
        try:  # it may take one image at a time only
            out = run(dark)
        except Exception:  # noqa: BLE001
            raise _does_not_run(loaded, [1, 3, size, size], exc) from None
        fixed = 1
    if not isinstance(out, torch.Tensor):
        raise UserError(f"{loaded.name} returns a {type(out).__name__}, not a logits tensor; wrap it in a module "
                        f"whose forward returns logits [N, classes]")
    rows = len(batch) if loaded.fixed_batch or fixed is None else 1
    if out.ndim != 2 or out.shape[0] != rows:
        raise UserError(f"{loaded.name} returns {list(out.shape)} for a {[rows, 3, size, size]} batch; cifarbench "
                        f"needs logits [N, classes]")
    if rows > 1:
        alone_batch = dark if fixed is None else dark.expand(fixed, -1, -1, -1).contiguous()
        try:
            alone = run(alone_batch)
        except Exception as exc:  # noqa: BLE001  (runs two images but not one: a model that wants pairs)
            raise _does_not_run(loaded, list(alone_batch.shape), exc) from None
        if isinstance(alone, torch.Tensor) and alone.ndim == 2 and alone.shape[1] == out.shape[1]:
            gap = _logit_gap(alone[0], out[0])
            tolerance = BATCH_TOLERANCE.get(str(out.dtype).replace("torch.", ""), 1e-4)
            if out.device.type == "cuda":  # TF32 convs and per-batch-size cuDNN algorithms round more
                tolerance = max(tolerance, 1e-2)
            if gap is not None and not gap <= tolerance:
                raise UserError(f"{loaded.name}'s output for an image depends on the other images in its batch "
                                f"(its logits, relative to their largest, move by up to {gap:.3g} when the other "
                                f"images change); cifarbench's analyses batch images, so their numbers would depend "
                                f"on the batching — make the model treat each image on its own (eval-mode "
                                f"BatchNorm, no statistics over the batch dimension)")
    # what the model computes on these images, to 3 significant digits (half precision: bit noise from thread
    # counts does not reach it): part of a Python model's digest, since its code can reach beyond any file cifarbench
    # can hash (a helper module the --arch file imports, attributes a factory sets)
    fingerprint = hashlib.sha256(out.detach().double().cpu().numpy().astype("float16").tobytes()).hexdigest()
    return int(out.shape[1]), fixed, fingerprint


def _logit_gap(a, b) -> float | None:
    """How far one image's logits moved between two runs, as softmax sees them: each row relative to its largest
    logit (a constant added to every logit changes no probability), over the classes finite in both and scaled
    by the larger of 1 and their spread; a different set of finite classes counts as infinitely far. None where
    no class is finite (NaN weights: the analyses say so themselves)."""
    import torch

    a, b = a.double(), b.double()
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not bool(fa.any()) and not bool(fb.any()):
        return None
    na, nb = a[~fa], b[~fb]
    if not torch.equal(fa, fb) or not bool(((na == nb) | (na.isnan() & nb.isnan())).all()):
        return float("inf")
    a, b = a[fa] - a[fa].max(), b[fb] - b[fb].max()
    scale = max(1.0, float(a.abs().max()), float(b.abs().max()))
    return float((a - b).abs().max()) / scale


def _does_not_run(loaded: _Loaded, shape: list, exc: Exception) -> UserError:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # TorchScript's first line is "The following operation failed in the TorchScript interpreter.": the line
    # that says what was expected is further down
    first = next((line for line in lines if "expected" in line.lower()), lines[0] if lines else "")[:160]
    # the probe runs more than one batch size: name the layout, not the one batch that failed
    layout = f"[N, 3, {shape[-2]}, {shape[-1]}]" if len(shape) == 4 else str(shape)
    hint = ("cifarbench feeds RGB images (3 channels): wrap a model of another channel count"
            if "channels" in text else "if it takes another image size, give --input-size (API: input_size=)")
    return UserError(f"{loaded.name} does not run on {layout} batches ({type(exc).__name__}: {first}); {hint}")


def _behaviour_digest(loaded: _Loaded, fingerprint: str) -> str:
    """The digest caches are keyed by: the content digest, and for a model built by Python code (a module, a
    state_dict with --arch) the fingerprint of its outputs on the probe's images as well."""
    if loaded.kind in ("module", "state-dict") and fingerprint:
        return hashlib.sha256(f"{loaded.digest}:{fingerprint}".encode()).hexdigest()
    return loaded.digest


def _finish(loaded: _Loaded, mean, std, names, input_size) -> ModelSource:
    if loaded.size is not None and input_size is not None and input_size != loaded.size:
        raise UserError(f"{loaded.name} takes {loaded.size}x{loaded.size} images, not {input_size}x{input_size}; "
                        f"drop the input size or give {loaded.size}")
    size = loaded.size or input_size or DEFAULT_INPUT_SIZE
    if size > MAX_INPUT_SIZE:
        raise UserError(f"{loaded.name} takes {size}x{size} images; cifarbench runs at most "
                        f"{MAX_INPUT_SIZE}x{MAX_INPUT_SIZE}")
    probed, fixed_batch, fingerprint = None, loaded.fixed_batch, ""
    if loaded.kind not in ("zoo", "checkpoint") and (loaded.module is not None or loaded.probe is not None) \
            and not (loaded.normalizes_inside and loaded.kind == "module"):
        # every model not cifarbench's own runs once here: the only way to know it takes S x S images and treats
        # each image on its own (an ONNX graph declaring [N, C] may still hold a training-mode BatchNorm)
        probed, fixed_batch, fingerprint = _probe(loaded, size)
    num_classes = probed if probed is not None else loaded.num_classes
    if num_classes is None or num_classes < 2:
        raise UserError(f"{loaded.name} outputs {num_classes} value(s) per image; cifarbench needs one logit per "
                        f"class (at least 2)")
    if loaded.num_classes is not None and probed is not None and probed != loaded.num_classes:
        raise UserError(f"{loaded.name}'s graph declares {loaded.num_classes} outputs but returns {probed}; "
                        f"re-export it")
    meta = loaded.metadata
    if mean is not None and loaded.normalizes_inside:
        raise UserError(f"{loaded.name} normalizes its input itself ((x - 0.5) / 0.5); drop --mean/--std")
    if mean is None and not loaded.normalizes_inside and "mean" in meta and "std" in meta:
        try:
            mean, std = parse_contract(json.loads(meta["mean"]), json.loads(meta["std"]))
        except (ValueError, UserError):
            raise UserError(f"{loaded.name}: corrupt mean/std in its cifarbench metadata; give --mean and --std") \
                from None
    if names is None and "classes" in meta:
        raw = meta["classes"]
        try:
            names = parse_classes(json.loads(raw) if isinstance(raw, str) else raw)
        except (ValueError, UserError):
            raise UserError(f"{loaded.name}: corrupt class names in its cifarbench metadata; give --classes") \
                from None
        if len(names) != num_classes:
            raise UserError(f"{loaded.name}'s metadata names {len(names)} classes but it outputs {num_classes}; "
                            f"give --classes with {num_classes} names")
    elif names is not None and len(names) != num_classes:
        raise UserError(f"{loaded.name} outputs {num_classes} classes but --classes names {len(names)}; "
                        f"give {num_classes} names")
    names = names or default_classes(num_classes)
    return ModelSource(kind=loaded.kind, name=loaded.name, module=loaded.module, onnx_path=loaded.onnx_path,
                       input_size=size, num_classes=num_classes, classes=tuple(names), mean=mean, std=std,
                       digest=_behaviour_digest(loaded, fingerprint), provenance=loaded.provenance,
                       path=loaded.path,
                       fixed_batch=fixed_batch, metadata=dict(meta))


def source_from_contract(kind: str, name: str, *, input_size: int, num_classes: int, metadata: dict | None = None,
                         path: Path | None = None, onnx_path: Path | None = None, fixed_batch: int | None = None,
                         digest: str = "", provenance: dict | None = None) -> ModelSource:
    """A :class:`ModelSource` for a graph whose shapes the caller has read already (an in-memory ONNX graph, a
    TensorRT engine's header): the contract (classes, mean/std; a zoo net's ``spec`` means normalization inside)
    comes from cifarbench's ``metadata`` under the same rules as :func:`resolve_source`. Nothing is run."""
    meta = dict(metadata or {})
    loaded = _Loaded(kind, name, onnx_path=onnx_path, path=path, digest=digest, provenance=provenance or {},
                     metadata=meta, fixed_batch=fixed_batch, size=input_size, num_classes=num_classes,
                     normalizes_inside="spec" in meta)
    return _finish(loaded, None, None, None, None)


__all__ = ["KINDS", "ModelSource", "resolve_source", "source_from_contract", "build_arch", "parse_arch_kw",
           "parse_classes", "parse_contract", "file_digest", "module_digest", "code_digest", "default_classes"]
