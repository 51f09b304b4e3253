"""Checkpoints: weights as safetensors with the run's metadata inside, training state via ``weights_only`` loads.

``<run>/best.safetensors`` and ``<run>/last.safetensors`` hold the weights and a JSON ``cifarbench`` metadata entry
(net, hparams, epoch, metrics, seed, data identity, versions). ``<run>/last.state.pt`` holds what resuming needs
(optimizer, scheduler, RNG states) and is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .io import atomic_path


def versions() -> dict:
    import numpy

    from . import __version__

    return {"cifarbench": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict, dtype: torch.dtype | None = None) -> None:
    state = {k: v.detach().to("cpu", dtype if (dtype and v.is_floating_point()) else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"cifarbench": json.dumps(meta)})


def read_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("cifarbench")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"corrupt or unreadable checkpoint {path}: {exc}") from None
    if raw is None:
        raise UserError(f"{path} is a safetensors file but not a cifarbench checkpoint (no metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise UserError(f"corrupt metadata in checkpoint {path}") from None
    if "net" not in meta or "hparams" not in meta:
        raise UserError(f"checkpoint {path} lacks the net name or hyper-parameters")
    return meta


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    meta = read_metadata(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"corrupt or unreadable checkpoint {path}: {exc}") from None
    return state, meta


def save_state(path: str | Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same to the user
        raise UserError(f"corrupt or unreadable training state {path}: {str(exc).splitlines()[0]}") from None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
