"""Model registry: ``list_models()``, ``create_model(name, **overrides)``, ``load_model(name_or_path)``.

The specs live in ``models/*.json`` (installed as ``cifarbench.models``); bundled weights, when trained, in
``models/weights/<name>.safetensors``.
"""
from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

import torch

from .errors import UserError
from .nets import CifarNet

HPARAMS = ("l1_oc", "filter_multiplier", "kernel_size", "stride", "dropout")
_TYPES = {"l1_oc": int, "filter_multiplier": float, "kernel_size": int, "stride": int, "dropout": float}


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
    try:
        return _specs()[name]
    except KeyError:
        raise UserError(f"unknown net {name!r}; known nets: {', '.join(list_models())}") from None


def resolve_hparams(name: str, **overrides) -> dict:
    """The net's defaults (the report's best config) with ``overrides`` applied and checked."""
    spec = get_spec(name)
    hp = dict(spec["defaults"])
    for key, value in overrides.items():
        if key not in HPARAMS:
            raise UserError(f"unknown hyper-parameter {key!r} for {name}; known: {', '.join(HPARAMS)}")
        if key == "dropout" and spec["defaults"]["dropout"] is None:
            if value not in (None, 0, 0.0):
                raise UserError(f"{name} has no dropout layers; dropout cannot be set")
            continue
        try:
            hp[key] = _TYPES[key](value)
        except (TypeError, ValueError):
            raise UserError(f"{key}={value!r} is not a valid {_TYPES[key].__name__}") from None
    if hp["l1_oc"] < 1 or hp["kernel_size"] < 1 or hp["stride"] < 1 or hp["filter_multiplier"] <= 0:
        raise UserError(f"hyper-parameters out of range: {hp}")
    if hp["dropout"] is not None and not 0.0 <= hp["dropout"] < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {hp['dropout']}")
    return hp


def create_model(name: str, **overrides) -> CifarNet:
    """A freshly initialised net (train mode). ``overrides`` may set any of :data:`HPARAMS`."""
    return CifarNet(get_spec(name), resolve_hparams(name, **overrides))


def bundled_weights(name: str) -> Path | None:
    path = Path(str(_models_dir().joinpath("weights", f"{name}.safetensors")))
    return path if path.is_file() else None


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu") -> CifarNet:
    """An eval-mode net with weights: a zoo name (bundled weights) or a checkpoint path (.safetensors)."""
    from .checkpoint import load_checkpoint

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
    state, meta = load_checkpoint(path)
    model = create_model(meta["net"], **meta["hparams"])
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not match {meta['net']} {meta['hparams']}: "
                        f"{str(exc).splitlines()[0]}") from None
    model.source = str(path)
    model.meta = meta
    return model.eval().to(device)
