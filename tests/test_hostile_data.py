"""Hostile and mistaken data (issue 12): the decoded-data cache follows content, class sets are checked by name,
16-bit images are scaled, and oversized archives and images are refused from their headers with bounded memory.

Big inputs are built small: a PNG of a 10000x10000 1-bit image is ~12 KB, and a .tar.gz with a 2 GiB member is a
tar header followed by 2,048 copies of one gzip member holding 1 MiB of zeros (gzip readers concatenate members).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarbench import data as data_mod
from cifarbench.data import CLASSES, load_split
from cifarbench.errors import UserError
from cli_helpers import assert_user_error, run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own decoded-data cache, so what it sees comes from its own files."""
    monkeypatch.setattr(data_mod, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _folder(root: Path, counts: dict[str, int], split: str = "test", start: int = 0) -> dict[tuple[str, str], int]:
    """PNGs under root/split/<class>/; returns {(class, file name): seed of its pixels}."""
    made = {}
    for cls, n in counts.items():
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + n):
            seed = zlib.crc32(f"{cls}/{i}".encode())
            Image.fromarray(_pixels(seed)).save(d / f"{i:04d}.png")
            made[cls, f"{i:04d}.png"] = seed
    return made


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


# ---------------------------------------------------------------- the decoded-data cache follows content


def test_images_added_to_a_class_folder_are_seen(tmp_path):
    _folder(tmp_path / "d", {c: 2 for c in CLASSES if c != "cat"} | {"cat": 20})
    first = load_split(str(tmp_path / "d"), "test")
    assert int((first.labels == CLASSES.index("cat")).sum()) == 20
    _folder(tmp_path / "d", {"cat": 10}, start=20)  # the root folder's own stat does not change
    again = load_split(str(tmp_path / "d"), "test")
    assert int((again.labels == CLASSES.index("cat")).sum()) == 30 and len(again) == len(first) + 10
    assert again.identity != first.identity


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(blob), 1_700_000_000
            tar.addfile(info, io.BytesIO(blob))


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_corrected_archive_with_same_size_and_mtime_gives_new_labels(tmp_path):
    a, b = _png_bytes(_pixels(1)), _png_bytes(_pixels(2))
    archive = tmp_path / "data.tar"
    # first copy: the two images under each other's class ("cat" and "dog" have one length: same archive size)
    _tar(archive, {"test/cat/a.png": a, "test/dog/b.png": b})
    stat = archive.stat()
    wrong = load_split(str(archive), "test")
    assert wrong.labels.tolist() == [CLASSES.index("cat"), CLASSES.index("dog")]
    _tar(archive, {"test/dog/a.png": a, "test/cat/b.png": b})  # the corrected archive, as cp -p would leave it
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert archive.stat().st_size == stat.st_size and archive.stat().st_mtime_ns == stat.st_mtime_ns
    fixed = load_split(str(archive), "test")
    assert fixed.labels.tolist() == [CLASSES.index("dog"), CLASSES.index("cat")]  # a.png, b.png in name order
    assert np.array_equal(fixed.images[0].permute(1, 2, 0).numpy(), _pixels(1))
    assert fixed.identity != wrong.identity


def test_a_folder_image_rewritten_with_its_old_size_and_mtime_is_decoded_again(tmp_path):
    """BMPs of one size are all the same length; rewriting one and setting its mtime back (cp -p, a reproducible
    archive) must not serve the old pixels from the decoded cache, nor keep the old identity."""
    folder = tmp_path / "bmp" / "test" / "cat"
    folder.mkdir(parents=True)
    Image.fromarray(_pixels(1)).save(folder / "a.bmp")
    before = load_split(str(tmp_path / "bmp"), "test")
    stat = (folder / "a.bmp").stat()
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(folder / "a.bmp")
    os.utime(folder / "a.bmp", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (folder / "a.bmp").stat().st_size == stat.st_size
    after = load_split(str(tmp_path / "bmp"), "test")
    assert int(after.images.min()) == 255 and after.identity != before.identity


def test_folder_and_its_archive_have_one_identity(tmp_path):
    _folder(tmp_path / "root", {"cat": 2, "dog": 1})
    with tarfile.open(tmp_path / "root.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "root" / "test", arcname="test")
    from_dir = load_split(str(tmp_path / "root"), "test")
    from_tar = load_split(str(tmp_path / "root.tar.gz"), "test")
    assert from_dir.identity.split(":")[2] == from_tar.identity.split(":")[2]
    assert torch.equal(from_dir.images, from_tar.images)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape", "missing_key", "pickled"])
def test_damaged_cache_is_rebuilt_with_one_warning(tmp_path, own_cache, capsys, damage):
    made = _folder(tmp_path / "d", {"cat": 2, "ship": 1})
    load_split(str(tmp_path / "d"), "test")
    (cache,) = (own_cache / "decoded").glob("*.npz")
    if damage == "truncate":
        cache.write_bytes(cache.read_bytes()[:300])
    elif damage == "garbage":
        cache.write_bytes(b"PK\x03\x04 not a zip at all")
    elif damage == "wrong_shape":
        np.savez(cache, images=np.zeros((3, 3, 16, 16), np.uint8), folders=np.array(["cat", "ship"]),
                 which=np.zeros(3, np.int64), digest=np.array("0" * 64))
    elif damage == "missing_key":
        np.savez(cache, images=np.zeros((3, 3, 32, 32), np.uint8))
    else:
        np.savez(cache, images=np.zeros((3, 3, 32, 32), np.uint8), folders=np.array([{"x": 1}], dtype=object),
                 which=np.zeros(3, np.int64), digest=np.array("0" * 64))
    capsys.readouterr()
    ds = load_split(str(tmp_path / "d"), "test")
    warnings = _warnings(capsys.readouterr().err)
    assert len([w for w in warnings if "decoded-data cache" in w]) == 1, warnings
    # the data is the files' pixels and labels, not the damaged file's
    expected = sorted(made, key=lambda e: (e[1], e[0]))  # test order: file name, then class
    assert ds.labels.tolist() == [CLASSES.index(c) for c, _ in expected]
    for i, key in enumerate(expected):
        assert np.array_equal(ds.images[i].permute(1, 2, 0).numpy(), _pixels(made[key]))
    load_split(str(tmp_path / "d"), "test")  # rewritten: no warning about the cache the next time
    assert not [w for w in _warnings(capsys.readouterr().err) if "decoded-data cache" in w]


# ---------------------------------------------------------------- class sets are checked by name


def test_eleventh_class_folder_exits_2_naming_it(tmp_path, capsys):
    _folder(tmp_path / "d", {c: 1 for c in CLASSES} | {"unicorn": 1})
    line = assert_user_error(capsys, "eval", "net1", "--data", tmp_path / "d", match="unicorn")
    assert "airplane" in line  # names the classes the model knows


def test_renamed_class_exits_2_instead_of_shifting_labels(tmp_path, capsys):
    _folder(tmp_path / "d", {("plane" if c == "airplane" else c): 1 for c in CLASSES})
    assert_user_error(capsys, "eval", "net1", "--data", tmp_path / "d", match="plane")
    with pytest.raises(UserError, match="plane"):
        load_split(str(tmp_path / "d"), "test")


def test_missing_class_loads_with_labels_by_name_and_one_warning(tmp_path, capsys):
    made = _folder(tmp_path / "d", {c: 2 for c in CLASSES if c != "airplane"})
    ds = load_split(str(tmp_path / "d"), "test")
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 1 and "airplane" in warnings[0], warnings
    assert ds.missing_classes == ("airplane",) and ds.classes == CLASSES
    for i in range(len(ds)):  # every label is its folder's index in the model's classes: nothing shifted
        key = next(k for k, seed in made.items() if np.array_equal(_pixels(seed), ds.images[i].permute(1, 2, 0)
                                                                    .numpy()))
        assert ds.labels[i] == CLASSES.index(key[0])
    code, out, err = run_cli(capsys, "eval", "net1", "--data", tmp_path / "d", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["per_class"]["airplane"] is None and result["images"] == 18
    assert len(_warnings(err)) == 1


def test_labels_follow_the_given_class_order(tmp_path):
    _folder(tmp_path / "d", {"cat": 1, "dog": 1})
    ds = load_split(str(tmp_path / "d"), "test", classes=("dog", "cat"))
    assert ds.labels.tolist() == [1, 0] and ds.classes == ("dog", "cat")  # 0000.png of cat, then of dog
    syn = load_split("synthetic:20", "test", classes=tuple(reversed(CLASSES)))
    ref = load_split("synthetic:20", "test")
    assert torch.equal(syn.labels, 9 - ref.labels)


# ---------------------------------------------------------------- 16-bit images are scaled, not clipped


def _png(width: int, height: int, depth: int, color: int, raw_rows) -> bytes:
    """A PNG written from its definition (signature, IHDR, zlib-compressed filter-0 rows, IEND)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\0" + row) for row in raw_rows) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


#: 16-bit samples and their 8-bit values (the high byte, as Pillow itself maps 16-bit RGB PNGs); anything above
#: 255 came out as 255 (white) before
SAMPLES = {0: 0, 255: 0, 256: 1, 1000: 3, 0x1234: 0x12, 0x8000: 128, 0xFF00: 255, 0xFFFF: 255}


def test_16bit_gray_png_is_scaled(tmp_path):
    from cifarbench.analysis.occlusion import load_image

    values = np.array(list(SAMPLES) * 128, np.uint16).reshape(32, 32)
    Image.fromarray(values).save(tmp_path / "g16.png")
    raw = (tmp_path / "g16.png").read_bytes()
    assert raw[24:26] == bytes([16, 0])  # IHDR: bit depth 16, gray
    expected = np.array(list(SAMPLES.values()) * 128, np.uint8).reshape(32, 32)
    image, _ = load_image(tmp_path / "g16.png")
    assert torch.equal(image, torch.from_numpy(np.stack([expected] * 3)).float() / 255)
    (tmp_path / "d" / "test" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "test" / "cat" / "g16.png").write_bytes(raw)
    ds = load_split(str(tmp_path / "d"), "test")
    assert np.array_equal(ds.images[0].numpy(), np.stack([expected] * 3))


def test_16bit_rgb_png_is_scaled(tmp_path):
    from cifarbench.analysis.occlusion import load_image

    keys = np.array(list(SAMPLES), np.uint16)
    rgb = np.stack([np.resize(np.roll(keys, c), (32, 32)) for c in range(3)], axis=2)  # [32, 32, 3]
    expected = np.stack([np.resize(np.roll(np.array(list(SAMPLES.values()), np.uint8), c), (32, 32))
                         for c in range(3)], axis=2)
    rows = [rgb[y].astype(">u2").tobytes() for y in range(32)]  # PNG samples are big-endian
    (tmp_path / "c16.png").write_bytes(_png(32, 32, 16, 2, rows))
    image, _ = load_image(tmp_path / "c16.png")
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1).float() / 255)


# ---------------------------------------------------------------- bounded resources


#: run in one child process: import what the commands import, then run each case through the CLI in-process and
#: record its peak RSS (VmHWM, reset before each case when /proc/self/clear_refs allows; else the running maximum,
#: still an upper bound); one process for all cases, because importing torch takes seconds here
_CHILD = r"""
import io, json, sys
import torch, PIL.Image, cifarbench.analysis.occlusion, cifarbench.runtime
from cifarbench.cli import main

def hwm_mb():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024

out = {"startup": hwm_mb(), "cases": []}
for args in json.loads(sys.argv[1]):
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out["reset"] = True
    except OSError:
        out["reset"] = False
    err, sys.stderr = sys.stderr, io.StringIO()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    text, sys.stderr = sys.stderr.getvalue(), err
    out["cases"].append({"args": args, "code": code, "stderr": text, "peak_mb": hwm_mb()})
print(json.dumps(out))
"""


def _zero_gzip_member(n: int) -> bytes:
    return gzip.compress(bytes(n), compresslevel=9, mtime=0)


def _big_member_targz(path: Path, name: str, size: int, type_=tarfile.REGTYPE) -> None:
    """A .tar.gz whose one member holds ``size`` zero bytes, written as concatenated gzip members."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, type_
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    mib = _zero_gzip_member(1 << 20)
    assert size % (1 << 20) == 0
    with open(path, "wb") as f:
        f.write(gzip.compress(header, mtime=0))
        for _ in range(size >> 20):
            f.write(mib)
        f.write(_zero_gzip_member(1024))  # end-of-archive blocks


def _bilevel_png(path: Path, side: int) -> None:
    """A 1-bit ``side`` x ``side`` black PNG: ~12 KB for 10000x10000."""
    row = bytes((side + 7) // 8)
    path.write_bytes(_png(side, side, 1, 0, (row for _ in range(side))))


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    """The hostile files, and each CLI case's exit code, stderr and peak RSS, from one child process."""
    root = tmp_path_factory.mktemp("bounded")
    _big_member_targz(root / "big.tar.gz", "test/cat/huge.png", 2 << 30)
    for side in (10000, 13500):
        _bilevel_png(root / f"p{side}.png", side)
    cases = {
        "tar": ["eval", "net1", "--data", str(root / "big.tar.gz")],
        **{f"png{side}{extra}": ["occlude", str(root / f"p{side}.png"), "--out", str(root / "o"), *extra.split()]
           for side in (10000, 13500) for extra in ("", " --resize")},
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIFARBENCH_CACHE_DIR": str(root / "cache")}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(list(cases.values()))], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nstart-up peak RSS {result['startup']:.0f} MB (per-case reset: {result['reset']})")
    for name, case in zip(cases, result["cases"]):
        print(f"peak RSS {case['peak_mb']:.0f} MB (+{case['peak_mb'] - result['startup']:.0f}): {name}")
    return root, result["startup"], dict(zip(cases, result["cases"]))


def _one_error_line(case: dict, startup: float) -> str:
    lines = [line for line in case["stderr"].strip().splitlines() if line.strip()]
    assert case["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), case
    # the input adds less than 150 MB to what starting the command takes (torch alone is ~520 MB with the CUDA
    # wheel, so the whole process cannot stay under 500 MB); the old code took 0.5 to 2.6 GB more
    assert case["peak_mb"] - startup < 150, (case["peak_mb"], startup)
    return lines[0]


def test_archive_member_of_2gib_is_refused_before_reading(bounded):
    root, startup, cases = bounded
    assert (root / "big.tar.gz").stat().st_size < 8 << 20
    line = _one_error_line(cases["tar"], startup)
    assert "huge.png" in line and "2,147,483,648 bytes" in line, line
    with pytest.raises(UserError, match="huge.png"):
        load_split(str(root / "big.tar.gz"), "test")


def test_archive_with_huge_pax_header_is_refused(tmp_path):
    archive = tmp_path / "pax.tar.gz"
    _big_member_targz(archive, "././@PaxHeader", 256 << 20, type_=tarfile.XHDTYPE)
    with pytest.raises(UserError, match="header"):
        load_split(str(archive), "test")


@pytest.mark.parametrize("side", [10000, 13500])
def test_huge_png_is_refused_from_its_header(bounded, tmp_path, side):
    root, startup, cases = bounded
    png = root / f"p{side}.png"
    assert png.stat().st_size < 64 << 10
    for extra in ("", " --resize"):  # not 32x32; and with --resize, over the largest size decoded at all
        line = _one_error_line(cases[f"png{side}{extra}"], startup)
        assert str(png) in line and ("10000x10000" in line if side == 10000 else "too large" in line), line
    assert not (root / "o").exists() or not any((root / "o").iterdir())
    # the same image inside an image folder is refused from its header too
    (tmp_path / "d" / "test" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "test" / "cat" / "x.png").write_bytes(png.read_bytes())
    with pytest.raises(UserError, match="x.png"):
        load_split(str(tmp_path / "d"), "test")


def test_oversized_image_file_in_folder_is_refused_before_reading(tmp_path):
    (tmp_path / "d" / "test" / "cat").mkdir(parents=True)
    with open(tmp_path / "d" / "test" / "cat" / "x.png", "wb") as f:
        f.truncate(3 << 20)  # sparse: 3 MB of nothing
    with pytest.raises(UserError, match="bytes"):
        load_split(str(tmp_path / "d"), "test")


def test_archive_member_count_and_image_count_are_bounded(tmp_path, monkeypatch):
    blob = _png_bytes(_pixels(0))
    _tar(tmp_path / "many.tar", {f"test/cat/{i:03d}.png": blob for i in range(12)}
         | {f"notes/{i}.txt": b"x" for i in range(12)})
    monkeypatch.setattr(data_mod, "MAX_IMAGES", 10)  # the real bounds (1,000,000 / 2,000,000) scaled down
    with pytest.raises(UserError, match="more than 10 images"):
        load_split(str(tmp_path / "many.tar"), "test")
    monkeypatch.setattr(data_mod, "MAX_IMAGES", 100)
    monkeypatch.setattr(data_mod, "MAX_MEMBERS", 20)
    with pytest.raises(UserError, match="more than 20 members"):
        load_split(str(tmp_path / "many.tar"), "test")
    monkeypatch.setattr(data_mod, "MAX_MEMBERS", 100)
    assert len(load_split(str(tmp_path / "many.tar"), "test")) == 12
