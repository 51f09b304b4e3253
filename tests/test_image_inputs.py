"""Images as users have them: dotted file names, EXIF-turned photos, transparency, animations, image folders with
more formats and stray files, and the options around them (--stride, --indices, --out). Maps are checked against
the definition (occlusion_reference.naive_map) on the pixels the user sees."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from cifarbench.zoo import load_model
from cli_helpers import assert_user_error, run_cli
from occlusion_reference import naive_map


@pytest.fixture(scope="module")
def net1():
    return load_model("net1")


def _pixels(seed, h=32, w=32, c=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), np.uint8)


def _as_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255


def _json(capsys, *args):
    code, out, err = run_cli(capsys, "occlude", "--json", "--no-figures", *args)
    assert code == 0, err
    return json.loads(out), err


def test_dotted_stems_keep_every_map(tmp_path, capsys, net1):
    """``my.cat.png`` writes my.cat_k4.npy (a name cut at its last dot would put every map in my.npy)."""
    names = ["my.cat.png", "my.dog.png", "v1.5.png"]
    for i, name in enumerate(names):
        Image.fromarray(_pixels(i)).save(tmp_path / name)
    doc, _ = _json(capsys, "--k", "4", "--k", "8", "--stride", "4", "--out", tmp_path / "o",
                   *[tmp_path / n for n in names])
    written = sorted(p.name for p in (tmp_path / "o").glob("*.npy"))
    assert written == sorted(f"{n[:-4]}_k{k}.npy" for n in names for k in (4, 8))
    listed = [f for r in doc["results"] for f in r["files"]]
    assert len(set(listed)) == len(listed) == 2 * 6  # every result names its own .npy and .csv
    for i, name in enumerate(names):
        for k in (4, 8):
            ref, _ = naive_map(net1, _as_tensor(_pixels(i)), k, 4)
            np.testing.assert_allclose(np.load(tmp_path / "o" / f"{name[:-4]}_k{k}.npy"), ref, atol=1e-5)


def test_stride_past_the_image_is_one_error_line_and_the_image_side_is_one_position(tmp_path, capsys):
    Image.fromarray(_pixels(0)).save(tmp_path / "a.png")
    assert_user_error(capsys, "occlude", "--k", "8", "--stride", "99999999999999999999", tmp_path / "a.png",
                      "--out", tmp_path / "o", match="stride must be between 1 and 32")
    assert not (tmp_path / "o").exists()
    doc, _ = _json(capsys, "--k", "8", "--stride", "32", tmp_path / "a.png", "--out", tmp_path / "o")
    assert np.load(doc["results"][0]["files"][0]).shape == (1, 1)


def test_exif_orientation_is_applied_before_the_size_check_and_the_map(tmp_path, capsys, net1):
    """A photo stored sideways with Orientation=6 is occluded as viewers show it, upright."""
    stored = _pixels(3)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "turned.png", exif=exif)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "turned.png")).convert("RGB"))
    assert not np.array_equal(upright, stored)  # the test means something
    doc, _ = _json(capsys, "--k", "8", "--stride", "4", tmp_path / "turned.png", "--out", tmp_path / "o")
    ref, target = naive_map(net1, _as_tensor(upright), 8, 4)
    r = doc["results"][0]
    assert r["target"] == target
    np.testing.assert_allclose(np.load(tmp_path / "o" / "turned_k8.npy"), ref, atol=1e-5)

    Image.fromarray(_pixels(4, h=32, w=40)).save(tmp_path / "wide.png", exif=exif)  # shown 32 wide, 40 high
    assert_user_error(capsys, "occlude", "--k", "8", tmp_path / "wide.png", "--out", tmp_path / "o2",
                      match="is 32x40, not 32x32")


def test_transparency_and_animation_are_named_in_one_warning_each(tmp_path, capsys, net1):
    rgba = _pixels(5, c=4)
    rgba[..., 3] = 0  # fully transparent: what is occluded is the stored RGB, and the user is told
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    frames = [Image.fromarray(_pixels(6 + i)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    doc, err = _json(capsys, "--k", "8", "--stride", "8", tmp_path / "clear.png", tmp_path / "anim.gif",
                     "--out", tmp_path / "o")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, err
    assert "clear.png" in warnings[0] and "transparency is ignored" in warnings[0]
    assert "anim.gif" in warnings[1] and "3 frames" in warnings[1] and "first" in warnings[1]
    ref, _ = naive_map(net1, _as_tensor(rgba[..., :3]), 8, 8)
    np.testing.assert_allclose(np.load(tmp_path / "o" / "clear_k8.npy"), ref, atol=1e-5)
    first = np.asarray(Image.open(tmp_path / "anim.gif").convert("RGB"))
    ref, _ = naive_map(net1, _as_tensor(first), 8, 8)
    np.testing.assert_allclose(np.load(tmp_path / "o" / "anim_k8.npy"), ref, atol=1e-5)


def test_an_opaque_rgb_png_warns_nothing(tmp_path, capsys):
    Image.fromarray(_pixels(0)).save(tmp_path / "a.png")
    _, err = _json(capsys, "--k", "8", "--stride", "8", tmp_path / "a.png", "--out", tmp_path / "o")
    assert "warning" not in err


def test_image_folder_reads_every_accepted_format_and_names_what_it_skipped(tmp_path, capsys, net1):
    """gif, tiff and ppm images count (the single-image decoder takes them); hidden files (macOS's ._x.png) are
    passed over quietly; anything else under a class folder is named in one warning, never dropped silently."""
    root = tmp_path / "ds"
    images = {}
    for cls, suffix in (("cat", ".gif"), ("dog", ".tif"), ("ship", ".ppm"), ("frog", ".png")):
        (root / "test" / cls).mkdir(parents=True)
        for i in range(2):
            rgb = _pixels(hash((cls, i)) % 1000)
            path = root / "test" / cls / f"{i}{suffix}"
            Image.fromarray(rgb).save(path)
            images[cls, i] = np.asarray(Image.open(path).convert("RGB"))  # gif is palettized: what it holds
    (root / "test" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (root / "test" / "cat" / "notes.txt").write_text("taken on a sunny day")
    (root / "test" / "dog" / "extra").mkdir()
    code, out, err = run_cli(capsys, "eval", "net1", "--data", root, "--json")
    assert code == 0, err
    doc = json.loads(out)
    with torch.no_grad():
        batch = torch.stack([_as_tensor(v) for v in images.values()])
        pred = net1(batch).argmax(1)
    from cifarbench.data import CLASSES

    labels = torch.tensor([CLASSES.index(cls) for cls, _ in images])
    assert doc["images"] == 8
    assert doc["accuracy"] == pytest.approx(float((pred == labels).float().mean()))
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "cat/notes.txt" in skipped[0] and "dog/extra/" in skipped[0], err
    assert "._0.png" not in err


def test_data_without_indices_takes_a_small_split_whole(tmp_path, capsys):
    doc, _ = _json(capsys, "--k", "8", "--stride", "8", "--data", "synthetic:12", "--out", tmp_path / "o")
    assert len(doc["results"]) == 10  # synthetic:12's test split holds 10 images; the default asks for 256
    assert doc["provenance"]["indices"] == "0:10"


@pytest.mark.parametrize("spec", ["a:b", "1_0", "-3:", "2:5:1", "", "1,,2", "٣"])
def test_indices_syntax_is_refused_before_the_data_is_opened(tmp_path, capsys, spec):
    """A typo in --indices is found before a (missing, here) dataset is even looked at."""
    assert_user_error(capsys, "occlude", "--k", "8", "--data", tmp_path / "no-such-folder", "--indices", spec,
                      "--out", tmp_path / "o", match="--indices")


def test_indices_past_the_end_and_without_data_are_refused(tmp_path, capsys):
    assert_user_error(capsys, "occlude", "--data", "synthetic:12", "--indices", "0:11", "--out", tmp_path / "o",
                      match="give an end of at most 10")
    Image.fromarray(_pixels(0)).save(tmp_path / "a.png")
    assert_user_error(capsys, "occlude", tmp_path / "a.png", "--indices", "0:3", "--out", tmp_path / "o",
                      match="--indices selects test images of --data")


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_out_is_refused_not_taken_as_the_current_folder(tmp_path, capsys, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(_pixels(0)).save(tmp_path / "a.png")
    assert_user_error(capsys, "occlude", "a.png", "--out", value, match="--out is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_data_dot_names_results_by_the_folders_own_name(tmp_path, capsys, monkeypatch):
    root = tmp_path / "mydata"
    (root / "test" / "cat").mkdir(parents=True)
    Image.fromarray(_pixels(0)).save(root / "test" / "cat" / "0.png")
    monkeypatch.chdir(root)
    doc, _ = _json(capsys, "--k", "8", "--stride", "8", "--data", ".", "--out", tmp_path / "o")
    assert (tmp_path / "o" / "mydata-test-00000_k8.npy").is_file(), sorted(p.name for p in (tmp_path / "o").iterdir())


def test_a_file_name_in_a_script_the_font_lacks_prints_no_glyph_warnings(tmp_path, capsys):
    Image.fromarray(_pixels(0)).save(tmp_path / "猫の写真.png")
    code, out, err = run_cli(capsys, "occlude", "--k", "8", "--stride", "8", tmp_path / "猫の写真.png",
                             "--out", tmp_path / "o")
    assert code == 0, err
    assert "Glyph" not in err and "warning" not in err.lower(), err
    assert (tmp_path / "o" / "猫の写真_occlusion.png").stat().st_size > 0
