"""Checkpoints: weights as safetensors with the run's metadata inside, training state via ``weights_only`` loads.

``<run>/best.safetensors`` and ``<run>/last.safetensors`` hold the weights and a JSON ``cifarbench`` metadata entry
(net, hparams, epoch, metrics, seed, data identity, versions). ``<run>/last.state.pt`` holds what resuming needs
(optimizer, scheduler, RNG states) and is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
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


def _write_error(path: str | Path, exc: Exception) -> UserError:
    """One line for a failed checkpoint write (full disk, file-size limit, read-only folder): the path, the reason,
    and that the previous file is still there (``atomic_path`` replaces it only after a complete write)."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:  # safetensors: 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space..." })'
        text = str(exc)
        found = re.search(r'message: "([^"]+)"', text)
        reason = found.group(1) if found else (text.splitlines() or [type(exc).__name__])[0]
    return UserError(f"cannot write {path}: {reason}; the previous {Path(path).name}, if any, is unchanged")


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict, dtype: torch.dtype | None = None) -> None:
    state = {k: v.detach().to("cpu", dtype if (dtype and v.is_floating_point()) else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    try:
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={"cifarbench": json.dumps(meta)})
    except (SafetensorError, OSError) as exc:
        raise _write_error(path, exc) from None


def read_metadata(path: str | Path) -> dict:
    """The checkpoint's ``cifarbench`` metadata, checked for shape: a JSON object with a net name (a string) and
    hyper-parameters (an object); their values are checked by ``zoo.check_hparams``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("cifarbench")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"corrupt or unreadable checkpoint {path}: {_first_line(exc)}") from None
    if raw is None:
        raise UserError(f"{path} is a safetensors file but not a cifarbench checkpoint (no metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise UserError(f"corrupt metadata in checkpoint {path}") from None
    if not isinstance(meta, dict):
        raise UserError(f"corrupt metadata in checkpoint {path}: a JSON {type(meta).__name__}, not an object")
    if "net" not in meta or "hparams" not in meta:
        raise UserError(f"checkpoint {path} lacks the net name or hyper-parameters")
    if not isinstance(meta["net"], str):
        raise UserError(f"corrupt metadata in checkpoint {path}: net is of type {type(meta['net']).__name__}, "
                        f"not a name")
    if not isinstance(meta["hparams"], dict):
        raise UserError(f"corrupt metadata in checkpoint {path}: hparams is of type "
                        f"{type(meta['hparams']).__name__}, "
                        f"not an object")
    return meta


def read_tensor_header(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """``{name: (dtype, shape)}`` from the safetensors header; reads no tensor data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = {}
            for key in f.keys():
                piece = f.get_slice(key)
                header[key] = (str(piece.get_dtype()), list(piece.get_shape()))
            return header
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"corrupt or unreadable checkpoint {path}: {_first_line(exc)}") from None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    meta = read_metadata(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"corrupt or unreadable checkpoint {path}: {_first_line(exc)}") from None
    return state, meta


class _WriteRecorder:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write: torch's zip writer turns it into a
    RuntimeError that says only 'unexpected pos 704 vs 598'; the user needs 'No space left on device'."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save_state(path: str | Path, state: dict) -> None:
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                out = _WriteRecorder(f)
                try:
                    torch.save(state, out)
                except RuntimeError as exc:
                    raise (out.error or exc) from None
    except (RuntimeError, OSError) as exc:
        raise _write_error(path, exc) from None


def load_state(path: str | Path) -> dict:
    """A training state, read with ``torch.load(weights_only=True)``: tensors and plain data only, never code.

    A file that holds anything else is refused as what it is; torch's own message would advise re-running with
    ``weights_only=False``, i.e. executing the file's code, so it is never repeated."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} is not a valid cifarbench training state: it holds Python objects other than "
                        f"tensors and plain data, and cifarbench never loads pickled code") from None
    except Exception as exc:  # torch raises many types for a damaged file; all mean the same to the user
        raise UserError(f"{path} is not a valid cifarbench training state (corrupt or truncated: "
                        f"{_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    """The first line of a library's message, never one that suggests loading untrusted data unsafely."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[0] if lines else type(exc).__name__


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
