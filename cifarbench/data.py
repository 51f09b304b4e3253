"""CIFAR-10 as uint8 tensors in memory, from three sources, and the report's augmentation run batched on-device.

``--data`` takes ``cifar10`` (torchvision's official copy under ``--data-dir``, downloaded when the network
allows), ``synthetic`` (a deterministic, learnable set for tests; ``synthetic:N`` sets the train size), or a PATH:
an official CIFAR-10 folder, or an image-folder root (``train/<class>/*``, ``test/<class>/*``) given as a
directory or a ``.tar.gz`` of one. Image folders are decoded once and cached as ``.npz``.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .io import atomic_path

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_DATA_DIR = Path(os.environ.get("CIFARBENCH_DATA_DIR", Path.home() / ".cache" / "cifarbench" / "data"))
CACHE_DIR = Path(os.environ.get("CIFARBENCH_CACHE_DIR", Path.home() / ".cache" / "cifarbench"))


@dataclass
class Dataset:
    """One split: ``images`` uint8 [N, 3, 32, 32], ``labels`` int64 [N], in a fixed, documented order."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    identity: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "Dataset":
        return Dataset(self.images[index], self.labels[index], self.classes, f"{self.identity}[{index}]")

    def float_images(self, device="cpu") -> torch.Tensor:
        return self.images.to(device).float().div_(255)


def load_split(source: str, split: str, data_dir: str | Path | None = None) -> Dataset:
    """``split`` is ``train`` or ``test``."""
    if split not in ("train", "test"):
        raise ValueError(split)
    if source == "cifar10":
        return _torchvision(Path(data_dir or DEFAULT_DATA_DIR), split, download=True)
    if source == "synthetic" or source.startswith("synthetic:"):
        return synthetic(split, _synthetic_size(source))
    path = Path(source)
    if not path.exists():
        raise UserError(f"--data {source}: no such file or directory (use cifar10, synthetic or a path)")
    if path.is_dir() and ((path / "cifar-10-batches-py").is_dir() or (path / "data_batch_1").is_file()):
        root = path if (path / "cifar-10-batches-py").is_dir() else path.parent
        return _torchvision(root, split, download=False)
    return _image_folder(path, split)


def _synthetic_size(source: str) -> int:
    if source == "synthetic":
        return 2000
    try:
        n = int(source.split(":", 1)[1])
    except ValueError:
        raise UserError(f"--data {source}: expected synthetic or synthetic:N") from None
    if n < 10:
        raise UserError(f"--data {source}: N must be at least 10")
    return n


def synthetic(split: str, n_train: int = 2000) -> Dataset:
    """Deterministic images whose class is a smooth colour pattern plus noise: learnable, fast, seed-stable."""
    n = n_train if split == "train" else max(n_train // 5, 10)
    g = torch.Generator().manual_seed(0)
    # each class: a 4x4 colour pattern upsampled to 32x32; shared across splits so test is learnable from train
    patterns = torch.rand(len(CLASSES), 3, 4, 4, generator=g)
    patterns = torch.nn.functional.interpolate(patterns, size=32, mode="bilinear", align_corners=False)
    g.manual_seed(1 if split == "train" else 2)
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=g)]
    noise = torch.rand(n, 3, 32, 32, generator=g)
    images = (0.6 * patterns[labels] + 0.4 * noise).mul(255).round().clamp(0, 255).to(torch.uint8)
    return Dataset(images, labels.long(), CLASSES, f"synthetic:{n_train}:{split}")


def _torchvision(root: Path, split: str, download: bool) -> Dataset:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=split == "train", download=False)
    except RuntimeError:
        if not download:
            raise UserError(f"{root} is not a complete official CIFAR-10 folder (cifar-10-batches-py)") from None
        try:
            ds = CIFAR10(str(root), train=split == "train", download=True)
        except Exception as exc:  # urllib/ssl/socket errors: the message is what matters
            raise UserError(f"cannot download CIFAR-10 to {root} ({type(exc).__name__}); put the official "
                            f"cifar-10-batches-py there or point --data-dir at it") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return Dataset(images, torch.tensor(ds.targets, dtype=torch.long), tuple(ds.classes), f"cifar10:{split}")


def _image_folder(path: Path, split: str) -> Dataset:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{split}|v2".encode()).hexdigest()[:16]
    cache = CACHE_DIR / "decoded" / f"{key}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            images, labels, classes = z["images"], z["labels"], tuple(z["classes"].tolist())
    else:
        images, labels, classes = _decode_folder(path, split)
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=images, labels=labels, classes=np.array(classes))
    return Dataset(torch.from_numpy(images), torch.from_numpy(labels).long(), classes,
                   f"imagefolder:{path.name}:{key}:{split}")


def _decode_folder(path: Path, split: str):
    from PIL import Image

    entries: list[tuple[str, str, callable]] = []  # (class, name, opener)
    if path.is_dir():
        root = path / split
        if not root.is_dir():
            raise UserError(f"--data {path}: expected {split}/<class>/<image> inside (an image-folder root)")
        for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    entries.append((cls_dir.name, f.name, f.read_bytes))
    elif tarfile.is_tarfile(path):
        # read members in archive order: seeking backwards in a gzip stream re-decompresses from the start
        with tarfile.open(path) as tar:
            for m in tar:
                parts = Path(m.name).parts
                parts = parts[parts.index(split):] if split in parts else ()
                if m.isfile() and len(parts) == 3 and Path(parts[2]).suffix.lower() in IMAGE_SUFFIXES:
                    blob = tar.extractfile(m).read()
                    entries.append((parts[1], parts[2], lambda blob=blob: blob))
    else:
        raise UserError(f"--data {path}: not a directory or a .tar.gz image-folder archive")
    if not entries:
        raise UserError(f"--data {path}: no images found under {split}/<class>/")
    # test images: file name first, class second, so classes interleave and "the first N test images" (--limit,
    # --flipped, --indices) cover every class, as in the official test set; training images stay class-major,
    # the order the bundled weights were trained with (each epoch permutes them anyway)
    entries.sort(key=(lambda e: (e[1], e[0])) if split == "test" else (lambda e: (e[0], e[1])))
    found = sorted({c for c, _, _ in entries})
    classes = CLASSES if set(found) <= set(CLASSES) else tuple(found)
    images = np.empty((len(entries), 3, 32, 32), np.uint8)
    labels = np.empty(len(entries), np.int64)
    for i, (cls, name, read) in enumerate(entries):
        try:
            img = Image.open(io.BytesIO(read())).convert("RGB")
        except Exception:
            raise UserError(f"--data {path}: cannot decode {split}/{cls}/{name}") from None
        if img.size != (32, 32):
            raise UserError(f"--data {path}: {split}/{cls}/{name} is {img.size[0]}x{img.size[1]}, not 32x32")
        images[i] = np.asarray(img).transpose(2, 0, 1)
        labels[i] = classes.index(cls)
    return images, labels, classes


def augment(images: torch.Tensor, generator: torch.Generator, crop: bool = True, flip: bool = True,
            jitter: float = 0.0) -> torch.Tensor:
    """The report's training augmentation on a uint8 batch, batched on its device; returns float [0, 1].

    Random 32x32 crop after zero padding 4, random horizontal flip, and colour jitter (brightness, contrast,
    saturation factors uniform in [1 - jitter, 1 + jitter]) as torchvision's ``ColorJitter`` defines them.
    """
    x = images.float().div_(255)
    n, dev = x.shape[0], x.device
    if crop:
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        oy = torch.randint(0, 9, (n,), device=dev, generator=generator)
        ox = torch.randint(0, 9, (n,), device=dev, generator=generator)
        ar = torch.arange(32, device=dev)
        rows, cols = (oy[:, None] + ar)[:, :, None], (ox[:, None] + ar)[:, None, :]
        x = padded.permute(0, 2, 3, 1)[torch.arange(n, device=dev)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, device=dev, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    if jitter > 0:
        def factor():
            return torch.empty(n, 1, 1, 1, device=dev).uniform_(1 - jitter, 1 + jitter, generator=generator)

        x = (x * factor()).clamp_(0, 1)
        gray = _grayscale(x)
        x = ((x - gray.mean((2, 3), keepdim=True)) * factor() + gray.mean((2, 3), keepdim=True)).clamp_(0, 1)
        gray = _grayscale(x)
        x = ((x - gray) * factor() + gray).clamp_(0, 1)
    return x.contiguous()


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
