"""Model registry: ``list_models()``, ``create_model(name, **overrides)``, ``load_model(name_or_path)``.

The specs live in ``models/*.json`` (installed as ``cifarbench.models``); bundled weights, when trained, in
``models/weights/<name>.safetensors``.
"""
from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources
from pathlib import Path

import torch

from .errors import UserError
from .nets import IMAGE_SIZE, CifarNet, plan_parameters

HPARAMS = ("l1_oc", "filter_multiplier", "kernel_size", "stride", "dropout")
_TYPES = {"l1_oc": int, "filter_multiplier": float, "kernel_size": int, "stride": int, "dropout": float}
# What each hyper-parameter may be: wide enough for any sensible CIFAR net (the report's grids use l1 <= 96,
# m <= 2, k <= 7, stride <= 2), narrow enough that no value can ask for an absurd allocation.
_RANGES = {"l1_oc": (1, 1024), "kernel_size": (1, IMAGE_SIZE), "stride": (1, 4)}
MAX_FILTER_MULTIPLIER = 16.0
#: the largest net cifarbench builds (2 GB of fp32 weights; the report's largest is 6.8 M parameters)
MAX_PARAMETERS = 500_000_000


def _models_dir():
    return resources.files("cifarbench.models")


@cache
def _specs() -> dict[str, dict]:
    specs = {}
    for entry in _models_dir().iterdir():
        if entry.name.endswith(".json"):
            spec = json.loads(entry.read_text())
            specs[spec["name"]] = spec
    return dict(sorted(specs.items()))


def list_models() -> list[str]:
    return list(_specs())


def get_spec(name: str) -> dict:
    if not isinstance(name, str):
        raise UserError(f"net name must be a string, got {type(name).__name__} {name!r}")
    try:
        return _specs()[name]
    except KeyError:
        raise UserError(f"unknown net {name!r}; known nets: {', '.join(list_models())}") from None


def _typed_value(key: str, value):
    """``value`` (a string from the command line, or a JSON number from a file) as the hyper-parameter's type, or
    the reason it is not one."""
    kind = _TYPES[key]
    if isinstance(value, str):
        try:
            return kind(value.strip()), None
        except ValueError:
            return None, f"is not a valid {kind.__name__}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # bool is an int to Python, not to us
        return None, f"is not a valid {kind.__name__} (a {type(value).__name__})"
    if kind is int:
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            return None, "is not a valid int"
        return int(value), None
    return float(value), None


def check_hparams(name: str, values: dict, context: str = "") -> dict:
    """The net's defaults with ``values`` applied, each checked for type and range, and the whole net's size checked
    arithmetically before anything is allocated. The one validator for ``--set``, sweep grids and checkpoint
    metadata; ``context`` (e.g. ``--set``, ``checkpoint PATH:``) starts every error message."""
    spec = get_spec(name)
    where = f"{context} " if context else ""
    if not isinstance(values, dict):
        raise UserError(f"{where}hyper-parameters must be a mapping of names to values, got "
                        f"{type(values).__name__}")
    hp = dict(spec["defaults"])
    for key, value in values.items():
        if key not in HPARAMS:
            raise UserError(f"{where}unknown hyper-parameter {key!r} for {name}; known: {', '.join(HPARAMS)}")
        if key == "dropout" and spec["defaults"]["dropout"] is None:
            if value not in (None, 0, 0.0, "0", "0.0"):
                raise UserError(f"{where}{name} has no dropout layers; dropout cannot be set")
            continue
        typed, why = _typed_value(key, value)
        if why is None:
            if key in _RANGES:
                lo, hi = _RANGES[key]
                if key == "kernel_size" and typed > IMAGE_SIZE:
                    why = f": a {typed}x{typed} kernel shrinks the image ({IMAGE_SIZE}x{IMAGE_SIZE}) to nothing"
                elif not lo <= typed <= hi:
                    why = f": {key} must be an integer in {lo}..{hi}"
            elif key == "filter_multiplier" and not (math.isfinite(typed) and 0 < typed <= MAX_FILTER_MULTIPLIER):
                why = f": {key} must be a number in (0, {MAX_FILTER_MULTIPLIER:g}]"
            elif key == "dropout" and not (math.isfinite(typed) and 0.0 <= typed < 1.0):
                why = f": {key} must be a number in [0, 1)"
        if why is not None:
            raise UserError(f"{where}{key}={value}{why if why.startswith(':') else ' ' + why}")
        hp[key] = typed
    n = plan_parameters(spec, hp)  # may raise: a conv with no filters, an image shrunk to nothing
    if n > MAX_PARAMETERS:
        raise UserError(f"{where}{name} with {', '.join(f'{k}={v}' for k, v in hp.items() if v is not None)} would "
                        f"have {n:,} parameters; cifarbench builds at most {MAX_PARAMETERS:,}")
    return hp


def resolve_hparams(name: str, **overrides) -> dict:
    """The net's defaults (the report's best config) with ``overrides`` applied and checked."""
    return check_hparams(name, overrides)


def create_model(name: str, **overrides) -> CifarNet:
    """A freshly initialised net (train mode). ``overrides`` may set any of :data:`HPARAMS`."""
    return CifarNet(get_spec(name), resolve_hparams(name, **overrides))


def bundled_weights(name: str) -> Path | None:
    path = Path(str(_models_dir().joinpath("weights", f"{name}.safetensors")))
    return path if path.is_file() else None


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu") -> CifarNet:
    """An eval-mode net with weights: a zoo name (bundled weights) or a checkpoint path (.safetensors)."""
    text = str(name_or_path)
    if text in _specs():
        path = bundled_weights(text)
        if path is None:
            raise UserError(f"{text} has no bundled weights yet; train it with `cifarbench train {text}` "
                            f"and pass the checkpoint path instead")
    else:
        path = Path(text)
        if path.is_dir():
            path = path / "best.safetensors"
        if not path.is_file():
            raise UserError(f"no such net or checkpoint: {text} (known nets: {', '.join(list_models())})")
    # checked before the weights are read; runtime.parse_device is the CLI's fuller check, but models sit below
    # runtime in the import order
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {str(device)!r}: no CUDA GPU here; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N")
    model = _load_checkpoint_model(path)
    model.source = str(path)
    return model.eval().to(device)


def _load_checkpoint_model(path: Path) -> CifarNet:
    """A checkpoint's net, every claim of the file checked before memory is spent on it: the metadata's net and
    hyper-parameters (types, ranges, size), then the header's tensor names, shapes and dtypes against the net built
    on the meta device (no storage); only then are the weights read. NaN or Inf weights load with a warning."""
    from .checkpoint import read_metadata, read_tensor_header
    from .errors import warn

    meta = read_metadata(path)
    try:
        spec = get_spec(meta["net"])
    except UserError as exc:
        raise UserError(f"checkpoint {path}: {exc}") from None
    hp = check_hparams(meta["net"], meta["hparams"], context=f"checkpoint {path}:")
    with torch.device("meta"):
        skeleton = CifarNet(spec, hp)
    expected = skeleton.state_dict()
    header = read_tensor_header(path)
    what = f"checkpoint {path} does not match {meta['net']} {hp}"
    missing, extra = [k for k in expected if k not in header], [k for k in header if k not in expected]
    if missing or extra:
        raise UserError(f"{what}: " + "; ".join(
            part for part in (f"missing {', '.join(missing[:3])}" if missing else "",
                              f"unexpected {', '.join(extra[:3])}" if extra else "") if part))
    for key, ref in expected.items():
        dtype, shape = header[key]
        if tuple(shape) != tuple(ref.shape):
            raise UserError(f"{what}: {key} has shape {list(shape)}, the net needs {list(ref.shape)}")
        if ref.is_floating_point() != (dtype in _FLOAT_DTYPES):
            kind = "floating-point" if ref.is_floating_point() else "integer"
            raise UserError(f"{what}: {key} is {dtype}, the net needs a {kind} tensor")
    from .checkpoint import load_checkpoint

    state, meta = load_checkpoint(path)
    model = CifarNet(spec, hp)
    try:
        model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
    except RuntimeError as exc:  # the header was checked above; this is a file changed while we read it
        raise UserError(f"{what}: {str(exc).splitlines()[0]}") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        warn(f"{path}: weights hold NaN or Inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); every "
             f"output of this model is meaningless")
    model.meta = meta
    return model


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "float16", "bfloat16", "float32", "float64"}
