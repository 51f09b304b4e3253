"""Data sources (synthetic, image folder, tar.gz, official) and the batched on-device augmentation."""
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from cifarbench.data import CLASSES, augment, load_split
from cifarbench.errors import UserError


def _write_folder(root, per_class=2, size=32):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in CLASSES[:3]:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")


def test_synthetic_is_deterministic_and_balanced():
    a, b = load_split("synthetic:100", "train"), load_split("synthetic:100", "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.dtype == torch.uint8 and a.images.shape == (100, 3, 32, 32)
    assert torch.bincount(a.labels).tolist() == [10] * 10


def test_image_folder_dir_and_tar_agree(tmp_path):
    _write_folder(tmp_path / "root")
    from_dir = load_split(str(tmp_path / "root"), "test")
    with tarfile.open(tmp_path / "root.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "root" / "train", arcname="train")
        tar.add(tmp_path / "root" / "test", arcname="test")
    from_tar = load_split(str(tmp_path / "root.tar.gz"), "test")
    assert torch.equal(from_dir.images, from_tar.images) and torch.equal(from_dir.labels, from_tar.labels)
    assert from_dir.labels.tolist() == [0, 1, 2, 0, 1, 2]  # classes interleaved: any prefix covers them all
    assert load_split(str(tmp_path / "root"), "train").labels.tolist() == [0, 0, 1, 1, 2, 2]
    png = np.asarray(Image.open(tmp_path / "root" / "test" / "automobile" / "0001.png"))
    assert np.array_equal(from_dir.images[4].permute(1, 2, 0).numpy(), png)
    again = load_split(str(tmp_path / "root"), "test")  # served from the decoded cache
    assert torch.equal(again.images, from_dir.images)


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "nope", "no such file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "expected test/"),
    (lambda p: [(p / "f.txt").write_text("x"), p / "f.txt"][1], "not a directory or"),
])
def test_bad_data_sources(tmp_path, make, match):
    with pytest.raises(UserError, match=match):
        load_split(str(make(tmp_path)), "test")


def test_wrong_size_and_corrupt_images_are_named(tmp_path):
    _write_folder(tmp_path / "a", size=28)
    with pytest.raises(UserError, match="not 32x32"):
        load_split(str(tmp_path / "a"), "train")
    _write_folder(tmp_path / "b")
    (tmp_path / "b" / "train" / "bird" / "0000.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot decode"):
        load_split(str(tmp_path / "b"), "train")


def test_official_format_read_through_torchvision(tmp_path, monkeypatch):
    import pickle

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    batch = {"data": data, "labels": [3, 1, 4, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CLASSES)}, f)
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # hand-made batches: no official md5
    ds = load_split(str(tmp_path), "test")
    assert ds.labels.tolist() == [3, 1, 4, 1]
    assert np.array_equal(ds.images[0].numpy().reshape(-1), data[0])


def test_cifar10_without_network_names_data_dir(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise OSError("network unreachable")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(UserError, match="--data-dir"):
        load_split("cifar10", "test", data_dir=tmp_path)


def test_augment_crops_flips_and_jitters_like_the_definitions():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = augment(img, g, crop=False, flip=True, jitter=0.0)
    x = img.float() / 255
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert (same | flipped).all() and same.any() and flipped.any()
    out = augment(img, torch.Generator().manual_seed(1), crop=True, flip=False)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for n in range(8):  # each output is some 32x32 window of the zero-padded image
        windows = padded[n].unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4)
        assert (windows == out[n]).flatten(2).all(2).any()
    jit = augment(img, torch.Generator().manual_seed(2), crop=False, flip=False, jitter=0.3)
    assert jit.min() >= 0 and jit.max() <= 1 and not torch.allclose(jit, x)
    again = augment(img, torch.Generator().manual_seed(2), crop=False, flip=False, jitter=0.3)
    assert torch.equal(jit, again)
