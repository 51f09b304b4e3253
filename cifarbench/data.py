"""CIFAR-10 as uint8 tensors in memory, from three sources, and the report's augmentation run batched on-device.

``--data`` takes ``cifar10`` (torchvision's official copy under ``--data-dir``, downloaded when the network
allows), ``synthetic`` (a deterministic, learnable set for tests; ``synthetic:N`` sets the train size), or a PATH:
an official CIFAR-10 folder, or an image-folder root (``train/<class>/*``, ``test/<class>/*``) given as a
directory or a ``.tar.gz`` of one.

Labels always come from class *names*, matched against the model's class names (``classes``, CIFAR-10's by
default): a class folder the model does not know is an error, a class with no images is allowed and reported.

Image folders are decoded once and cached as ``.npz`` under a key made from content, never from the path: an
archive's sha256, or for a directory every image's relative path, size, inode, mtime and ctime. A damaged cache
file is rebuilt with one warning. The dataset's identity carries a digest of the images' bytes and relative paths, so
the same images give the same identity from a folder or its archive, and any change to them a different one.
Archives are read member by member with every size checked before it is read (see the ``MAX_*`` bounds).
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, warn
from .images import SUFFIXES as IMAGE_SUFFIXES
from .io import atomic_path

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_DATA_DIR = Path(os.environ.get("CIFARBENCH_DATA_DIR", Path.home() / ".cache" / "cifarbench" / "data"))
#: names the default ``--data`` (a path to a CIFAR-10 folder or archive, or ``cifar10``/``synthetic``), so a
#: machine without internet can point every command at its own copy once
DATA_ENV = "CIFARBENCH_DATA"
#: what to tell a user whose ``cifar10`` cannot be downloaded
OFFLINE_HINT = (f"pass --data PATH (an official cifar-10-batches-py folder, an image-folder root or its .tar.gz), "
                f"or set {DATA_ENV}=PATH once for every command")
#: the zoo nets' bundled INT8 calibration set (CIFAR-10 training images, uint8) and its provenance file
CALIBRATION_NAME = "calib-cifar10-250"
CACHE_DIR = Path(os.environ.get("CIFARBENCH_CACHE_DIR", Path.home() / ".cache" / "cifarbench"))

#: one image file (or archive member) at most; a 32x32 image is a few KB even as an uncompressed BMP, so this
#: only refuses what cannot be a CIFAR image, before its bytes are read
MAX_IMAGE_BYTES = 1 << 20
#: images per split at most (CIFAR-10 has 50,000 training images); 1,000,000 decoded images take 3 GB
MAX_IMAGES = 1_000_000
#: archive members walked at most, and their total size: skipping a member still decompresses it
MAX_MEMBERS = 2 * MAX_IMAGES
MAX_ARCHIVE_BYTES = 8 << 30
#: pax and GNU long-name headers, which tarfile reads whole into memory before handing out the member
MAX_TAR_HEADER_BYTES = 1 << 20
#: bump when the cache file's layout or the decoding changes, so old files are never read as new ones
CACHE_FORMAT = "v4"  # v4: EXIF orientation applied, gif/tiff/ppm images read


@dataclass
class Dataset:
    """One split: ``images`` uint8 [N, 3, 32, 32], ``labels`` int64 [N] (indices into ``classes``, the model's
    class names), in a fixed, documented order. ``missing_classes``: those of ``classes`` with no image here."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    identity: str
    missing_classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "Dataset":
        return Dataset(self.images[index], self.labels[index], self.classes, f"{self.identity}[{index}]",
                       self.missing_classes)

    def float_images(self, device="cpu") -> torch.Tensor:
        return self.images.to(device).float().div_(255)


def default_data() -> str:
    """The default ``--data``: ``$CIFARBENCH_DATA`` when set (and not blank), else ``cifar10``."""
    value = os.environ.get(DATA_ENV, "").strip()
    return value or "cifar10"


def data_settings() -> dict:
    """What ``cifarbench models``/``config`` shows: the default data, where it comes from, and the caches."""
    env = os.environ.get(DATA_ENV, "").strip()
    return {"data": default_data(), "data_from": f"${DATA_ENV}" if env else "built-in default",
            "data_dir": str(DEFAULT_DATA_DIR), "cache_dir": str(CACHE_DIR),
            "calibration": str(_calibration_paths()[0])}


def load_split(source: str, split: str, data_dir: str | Path | None = None,
               classes: tuple[str, ...] | list[str] | None = None) -> Dataset:
    """``split`` is ``train`` or ``test``; ``classes`` are the model's class names in its output order (default:
    CIFAR-10's). Labels are the index of each image's class name in ``classes``."""
    if split not in ("train", "test"):
        raise ValueError(split)
    classes = _check_classes(classes)
    if source == "cifar10":
        return _torchvision(Path(data_dir or DEFAULT_DATA_DIR), split, download=True, classes=classes)
    if source == "synthetic" or source.startswith("synthetic:"):
        return synthetic(split, _synthetic_size(source), classes=classes)
    path = Path(source)
    if not path.exists():
        raise UserError(f"--data {source}: no such file or directory (use cifar10, synthetic or a path)")
    if path.is_dir() and ((path / "cifar-10-batches-py").is_dir() or (path / "data_batch_1").is_file()):
        root = path if (path / "cifar-10-batches-py").is_dir() else path.parent
        return _torchvision(root, split, download=False, classes=classes)
    return _image_folder(path, split, classes)


def _check_classes(classes) -> tuple[str, ...]:
    if classes is None:
        return CLASSES
    classes = tuple(classes)
    if not classes or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise UserError(f"the model's class names must be distinct non-empty names, got {list(classes)[:20]}")
    return classes


class UnknownClasses(UserError):
    """Class folders the model's class names do not include (a caller may add what to do about it)."""


def _check_known(names, classes: tuple[str, ...], where: str) -> None:
    unknown = sorted(n for n in set(names) if n not in classes)
    if unknown:
        def few(items, n=12):  # a 100-class model's names would make a 1,000-character error line
            return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")

        raise UnknownClasses(f"{where}: class {'folder' if len(unknown) == 1 else 'folders'} "
                             f"{few(unknown)} not among the model's classes ({few(list(classes))})")


def _labels(names, which: np.ndarray, classes: tuple[str, ...], where: str) -> tuple[np.ndarray, tuple]:
    """Labels for images whose class name is ``names[which[i]]``, as indices into the model's ``classes``.

    A name the model does not know is an error (never a shifted or re-sorted label); model classes without any
    image are returned (and reported in one warning line): their accuracy is undefined, not zero."""
    names = [str(n) for n in names]
    _check_known(names, classes, where)
    to_model = np.array([classes.index(n) for n in names], dtype=np.int64)
    labels = to_model[which] if len(which) else np.empty(0, np.int64)
    present = np.bincount(labels, minlength=len(classes)) > 0
    missing = tuple(c for c, p in zip(classes, present) if not p)
    if missing:
        warn(f"{where}: no images of class{'es' if len(missing) > 1 else ''} {', '.join(missing)}; "
             f"{'their' if len(missing) > 1 else 'its'} per-class results are missing (not zero)")
    return labels, missing


def _synthetic_size(source: str) -> int:
    if source == "synthetic":
        return 2000
    try:
        n = int(source.split(":", 1)[1])
    except ValueError:
        raise UserError(f"--data {source}: expected synthetic or synthetic:N") from None
    if n < 10:
        raise UserError(f"--data {source}: N must be at least 10")
    if n > MAX_IMAGES:
        raise UserError(f"--data {source}: N must be at most {MAX_IMAGES:,}")
    return n


def synthetic(split: str, n_train: int = 2000, classes: tuple[str, ...] | None = None) -> Dataset:
    """Deterministic images whose class is a smooth colour pattern plus noise: learnable, fast, seed-stable.

    The images are CIFAR-10's ten classes by name; ``classes`` (default CIFAR-10's) orders the labels."""
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
    classes = _check_classes(classes)
    model_labels, missing = _labels(CLASSES, labels.numpy(), classes, f"--data synthetic:{n_train} {split}")
    return Dataset(images, torch.from_numpy(model_labels), classes, f"synthetic:{n_train}:{split}", missing)


def _torchvision(root: Path, split: str, download: bool, classes: tuple[str, ...] = CLASSES) -> Dataset:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=split == "train", download=False)
    except RuntimeError:
        if not download:
            raise UserError(f"{root} is not a complete official CIFAR-10 folder (cifar-10-batches-py)") from None
        try:
            ds = CIFAR10(str(root), train=split == "train", download=True)
        except Exception as exc:  # urllib/ssl/socket errors: the message is what matters
            raise UserError(f"cannot download CIFAR-10 to {root} ({type(exc).__name__}); {OFFLINE_HINT} "
                            f"(or put the official cifar-10-batches-py under --data-dir)") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    targets = np.asarray(ds.targets, dtype=np.int64)
    if targets.size and (targets.min() < 0 or targets.max() >= len(ds.classes)):
        raise UserError(f"{root}: official CIFAR-10 labels outside its {len(ds.classes)} class names")
    labels, missing = _labels(ds.classes, targets, classes, f"{root} {split}")
    return Dataset(images, torch.from_numpy(labels), classes, f"cifar10:{split}", missing)


# ---------------------------------------------------------------- image folders and archives


def _image_folder(path: Path, split: str, classes: tuple[str, ...]) -> Dataset:
    where = f"--data {path}"
    if path.is_dir():
        root = path / split
        if not root.is_dir():
            raise UserError(f"{where}: expected {split}/<class>/<image> inside (an image-folder root)")
        files = _list_folder(root, where, split)
        _check_known({cls for cls, *_ in files}, classes, f"{where} {split}")  # before decoding anything
        listing = hashlib.sha256()
        for cls, name, _, size, stamp in files:
            listing.update(f"{cls}\0{name}\0{size}\0{stamp}\0".encode())  # names cannot hold NUL
        source_key = f"dir:{listing.hexdigest()}"
    else:
        if not _is_tar(path):
            raise UserError(f"{where}: not a directory or a .tar.gz image-folder archive")
        source_key = f"tar:{_sha256_file(path)}"
    key = hashlib.sha256(f"{CACHE_FORMAT}|{split}|{source_key}".encode()).hexdigest()[:32]
    cache = CACHE_DIR / "decoded" / f"{key}.npz"
    decoded = _read_cache(cache) if cache.exists() else None
    if decoded is None:
        entries = _decode_files(files, where, split) if path.is_dir() else _decode_tar(path, where, split)
        decoded = _assemble(entries, split, where)
        _write_cache(cache, decoded)
    images, folders, which, digest = decoded
    labels, missing = _labels(folders, which, classes, f"{where} {split}")
    return Dataset(torch.from_numpy(images), torch.from_numpy(labels), classes,
                   f"imagefolder:{path.name.replace(':', '_')}:{digest[:16]}:{split}", missing)


def _list_folder(root: Path, where: str, split: str) -> list[tuple[str, str, Path, int, str]]:
    """(class, file name, path, size, stamp) of every image under ``root/<class>/``, sizes checked. The stamp is
    the file's inode, mtime and ctime: rewriting an image of the same size and setting its mtime back (``cp -p``,
    a reproducible archive's fixed mtimes, ``os.utime``) still changes its ctime, which no program can set, so
    the decoded cache is never served for changed pixels; a copied folder is decoded again (same identity)."""
    files, skipped = [], []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(cls_dir.iterdir()):
            if not _is_image_name(f.name) or not f.is_file():
                if not f.name.startswith("."):  # hidden files (.DS_Store, macOS's ._x.png) go unmentioned
                    skipped.append(f"{cls_dir.name}/{f.name}" + ("/" if f.is_dir() else ""))
                continue
            st = f.stat()
            if st.st_size > MAX_IMAGE_BYTES:
                raise UserError(f"{where}: {split}/{cls_dir.name}/{f.name} is {st.st_size:,} bytes; an image "
                                f"may be at most {MAX_IMAGE_BYTES:,} (32x32 images are a few KB)")
            files.append((cls_dir.name, f.name, f, st.st_size, f"{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"))
            if len(files) > MAX_IMAGES:
                raise UserError(f"{where}: more than {MAX_IMAGES:,} images under {split}/")
    if not files:
        raise UserError(f"{where}: no images found under {split}/<class>/")
    _warn_skipped(skipped, where, split)
    return files


def _is_image_name(name: str) -> bool:
    """Whether an image folder's file is read as an image: an image suffix, and not hidden (macOS puts a
    ``._x.png`` of resource data beside every ``x.png`` it copies)."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _warn_skipped(skipped: list[str], where: str, split: str) -> None:
    if skipped:
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        warn(f"{where}: skipped {len(skipped)} entr{'ies' if len(skipped) > 1 else 'y'} under {split}/<class>/ "
             f"that {'are' if len(skipped) > 1 else 'is'} not an image file ({shown}); images are read from "
             f"{', '.join(IMAGE_SUFFIXES)} files")


def _decode_files(files, where: str, split: str) -> dict:
    entries = {}
    for cls, name, f, _, _ in files:
        try:
            blob = f.read_bytes()
        except OSError as exc:
            raise UserError(f"{where}: cannot read {split}/{cls}/{name} ({exc.strerror or exc})") from None
        entries[cls, name] = _decode_one(blob, f"{where}: {split}/{cls}/{name}")
    return entries


class _HeaderTooLarge(UserError):
    pass


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses pax / GNU long-name headers over :data:`MAX_TAR_HEADER_BYTES`: tarfile reads them whole."""

    def _proc_member(self, tarfile_):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE) and self.size > MAX_TAR_HEADER_BYTES:
            raise _HeaderTooLarge(f"archive header block of {self.size:,} bytes (at most "
                                  f"{MAX_TAR_HEADER_BYTES:,})")
        return super()._proc_member(tarfile_)


def _is_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, tarinfo=_BoundedTarInfo):
            return True
    except _HeaderTooLarge:
        return True  # a tar archive, refused with its reason when it is read
    except (tarfile.TarError, OSError, EOFError):
        return False


def _decode_tar(path: Path, where: str, split: str) -> dict:
    """Images under ``.../<split>/<class>/<name>`` in the archive, read member by member in archive order
    (seeking backwards in a gzip stream would re-decompress from the start). Each member's size is checked
    before its bytes are read; the member count and the total size walked are bounded."""
    import zlib

    entries, skipped = {}, []
    members = walked = 0
    try:
        with tarfile.open(path, tarinfo=_BoundedTarInfo) as tar:
            while (m := tar.next()) is not None:
                # tarfile keeps every TarInfo it has read (~600 bytes each); only this one is needed
                tar.members.clear()
                members += 1
                walked += m.size + 512
                if members > MAX_MEMBERS or walked > MAX_ARCHIVE_BYTES:
                    raise UserError(f"{where}: archive holds more than {MAX_MEMBERS:,} members or "
                                    f"{MAX_ARCHIVE_BYTES >> 30} GiB; not a CIFAR image folder")
                parts = Path(m.name).parts
                parts = parts[parts.index(split):] if split in parts else ()
                if not (m.isfile() and len(parts) == 3 and _is_image_name(parts[2])):
                    if m.isfile() and len(parts) >= 3 and not parts[-1].startswith("."):
                        skipped.append("/".join(parts[1:]))
                    continue
                name = f"{where}: {'/'.join(parts)}"
                if m.size > MAX_IMAGE_BYTES:
                    raise UserError(f"{name} is {m.size:,} bytes; an image may be at most {MAX_IMAGE_BYTES:,} "
                                    f"(32x32 images are a few KB)")
                if (parts[1], parts[2]) not in entries and len(entries) >= MAX_IMAGES:
                    raise UserError(f"{where}: more than {MAX_IMAGES:,} images under {split}/")
                blob = tar.extractfile(m).read(MAX_IMAGE_BYTES + 1)
                # a name stored twice: the later member wins, as when the archive is extracted
                entries[parts[1], parts[2]] = _decode_one(blob, name)
    except _HeaderTooLarge as exc:
        raise UserError(f"{where}: {exc}") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{where}: corrupt or truncated archive ({type(exc).__name__}: {exc})") from None
    if not entries:
        raise UserError(f"{where}: no images found under {split}/<class>/")
    _warn_skipped(skipped, where, split)
    return entries


def _decode_one(blob: bytes, name: str) -> tuple[np.ndarray, bytes]:
    """The image's [32, 32, 3] pixels (its size checked from the header before decoding) and its bytes'
    sha256, which goes into the dataset's identity."""
    from .images import read_rgb

    return read_rgb(blob, name, size=32), hashlib.sha256(blob).digest()


def _assemble(entries: dict, split: str, where: str):
    """(images uint8 [N, 3, 32, 32], class names, class index per image, content digest) in the split's order.

    Test images: file name first, class second, so classes interleave and "the first N test images" (--limit,
    --flipped, --indices) cover every class, as in the official test set; training images stay class-major,
    the order the bundled weights were trained with (each epoch permutes them anyway)."""
    keys = sorted(entries, key=(lambda e: (e[1], e[0])) if split == "test" else (lambda e: (e[0], e[1])))
    folders = sorted({cls for cls, _ in keys})
    index = {cls: i for i, cls in enumerate(folders)}
    images = np.empty((len(keys), 3, 32, 32), np.uint8)  # the count is known and bounded here
    which = np.empty(len(keys), np.int64)
    digest = hashlib.sha256(f"{split}\n".encode())
    for i, key in enumerate(keys):
        pixels, sha = entries[key]
        images[i] = pixels.transpose(2, 0, 1)
        which[i] = index[key[0]]
    for key in sorted(keys):  # the identity does not depend on the split's order or the source's layout
        digest.update(f"{key[0]}/{key[1]}\0".encode() + entries[key][1])
    return images, folders, which, digest.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        raise UserError(f"--data {path}: cannot read it ({exc.strerror or exc})") from None
    return h.hexdigest()


def _read_cache(cache: Path):
    """The decoded split from ``cache``, or None (after one warning) if the file is damaged in any way."""
    try:
        with np.load(cache, allow_pickle=False) as z:
            images, folders, which, digest = z["images"], z["folders"], z["which"], z["digest"]
        n = len(images)
        ok = (images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32) and 0 < n <= MAX_IMAGES
              and folders.dtype.kind == "U" and folders.ndim == 1 and len(folders) > 0
              and which.dtype == np.int64 and which.shape == (n,)
              and int(which.min()) >= 0 and int(which.max()) < len(folders)
              and digest.dtype.kind == "U" and digest.ndim == 0 and len(str(digest)) == 64)
        if ok:
            return images, [str(f) for f in folders], which, str(digest)
        problem = "unexpected contents"
    except Exception as exc:  # noqa: BLE001  BadZipFile, EOFError, KeyError, ValueError...: all mean "damaged"
        problem = f"{type(exc).__name__}"
    warn(f"decoded-data cache {cache} is damaged ({problem}); decoding the images again")
    return None


def _write_cache(cache: Path, decoded) -> None:
    images, folders, which, digest = decoded
    try:
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=images, folders=np.array(folders), which=which, digest=np.array(digest))
    except OSError as exc:
        warn(f"cannot write the decoded-data cache {cache} ({exc.strerror or exc}); the images will be decoded "
             f"again next time")


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


# ---------------------------------------------------------------- the bundled calibration set


def _calibration_paths() -> tuple[Path, Path]:
    from importlib import resources

    folder = Path(str(resources.files("cifarbench.models").joinpath("weights")))
    return folder / f"{CALIBRATION_NAME}.npz", folder / f"{CALIBRATION_NAME}.json"


def bundled_calibration(classes: tuple[str, ...] | list[str] | None = None) -> Dataset:
    """The zoo nets' INT8 calibration set: 250 CIFAR-10 training images (25 per class, uint8), shipped beside
    the bundled weights, so ``--backend onnx-int8`` and ``export --to onnx-int8`` work offline. Its JSON file
    records the source archive, the members chosen, and the sha256 checked here before the images are used."""
    npz, meta_path = _calibration_paths()
    if not npz.is_file() or not meta_path.is_file():
        raise UserError(f"the bundled calibration set is missing ({npz.name}); pass --calib-data PATH")
    import json

    meta = json.loads(meta_path.read_text())
    if _sha256_file(npz) != meta["sha256"]:
        raise UserError(f"{npz}: does not match the sha256 in {meta_path.name} (damaged install); reinstall "
                        f"cifarbench or pass --calib-data PATH")
    with np.load(npz, allow_pickle=False) as f:
        images, which, names = f["images"], f["labels"], tuple(str(c) for c in f["classes"])
    classes = _check_classes(classes)
    labels, missing = _labels(names, which.astype(np.int64), classes, npz.name)
    return Dataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), classes,
                   f"calibration:{meta['images_sha256'][:16]}", missing)


def build_calibration(archive: str | Path, out_dir: str | Path, per_class: int = 25, seed: int = 0) -> Path:
    """Build ``CALIBRATION_NAME.npz`` and its provenance JSON from a CIFAR-10 image-folder archive (the
    ``train/<class>/*`` members): ``per_class`` images of each class, chosen with ``numpy.random.default_rng(seed)``
    among that class's members sorted by name. Run once by the maintainers; recorded here so it can be rerun::

        python -c "from cifarbench.data import build_calibration as b; b('../shared/data/cifar10-jpeg75.tar.gz', 'models/weights')"
    """
    import io

    from .io import write_json

    archive, out_dir = Path(archive), Path(out_dir)
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lstrip("./").startswith("train/")
                   and Path(m.name).suffix.lower() in IMAGE_SUFFIXES]
        by_class: dict[str, list] = {}
        for m in members:
            by_class.setdefault(Path(m.name).parent.name, []).append(m)
        unknown = sorted(set(by_class) - set(CLASSES))
        if unknown:
            raise UserError(f"{archive}: classes {unknown} are not CIFAR-10's")
        rng = np.random.default_rng(seed)
        chosen, picked = [], {}
        for label, cls in enumerate(CLASSES):
            pool = sorted(by_class.get(cls, []), key=lambda m: m.name)
            if len(pool) < per_class:
                raise UserError(f"{archive}: {cls} has {len(pool)} training images, fewer than {per_class}")
            idx = sorted(int(i) for i in rng.choice(len(pool), per_class, replace=False))
            picked[cls] = idx
            chosen += [(label, pool[i]) for i in idx]
        images = np.empty((len(chosen), 3, 32, 32), np.uint8)
        labels = np.empty(len(chosen), np.int64)
        for n, (label, m) in enumerate(chosen):
            blob = tar.extractfile(m).read(MAX_IMAGE_BYTES + 1)
            pixels, _ = _decode_one(blob, m.name)
            images[n], labels[n] = pixels.transpose(2, 0, 1), label
    npz = out_dir / f"{CALIBRATION_NAME}.npz"
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, labels=labels, classes=np.array(CLASSES))
    with atomic_path(npz) as tmp:
        tmp.write_bytes(buf.getvalue())
    meta = {
        "name": CALIBRATION_NAME, "purpose": "INT8 calibration of the zoo nets (ONNX Runtime static quantization)",
        "images": len(chosen), "per_class": per_class, "classes": list(CLASSES), "layout": "uint8 [N, 3, 32, 32] RGB",
        "source": {"file": archive.name, "sha256": _sha256_file(archive), "split": "train",
                   "description": "CIFAR-10 (Krizhevsky, 2009) training images, public copy re-encoded as JPEG q75"},
        "selection": {"seed": seed, "rule": "per class: numpy.random.default_rng(seed).choice over that class's "
                                            "train/<class>/ members sorted by name, without replacement",
                      "indices": picked, "members": [m.name for _, m in chosen]},
        "license": "CIFAR-10 is distributed by its authors (https://www.cs.toronto.edu/~kriz/cifar.html) for "
                   "research use with no stated license; cite Krizhevsky, Learning Multiple Layers of Features "
                   "from Tiny Images, 2009.",
        "images_sha256": hashlib.sha256(images.tobytes()).hexdigest(),
        "sha256": _sha256_file(npz),
        "built_by": "cifarbench.data.build_calibration",
    }
    write_json(out_dir / f"{CALIBRATION_NAME}.json", meta)
    return npz
