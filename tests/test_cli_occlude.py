"""``cifarbench occlude`` end to end: files written, JSON on stdout only, user mistakes exit 2 with one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import random_model

from cifarbench import occlusion_map
from cifarbench.checkpoint import save_checkpoint
from cifarbench.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "net1.safetensors"
    model = random_model("net1", seed=21)
    save_checkpoint(path, model, {"net": "net1", "hparams": model.hparams})
    return path


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_json_and_files_for_several_k(checkpoint, tmp_path, capsys):
    code, out, err = run(["occlude", "--k", "8", "--k", "12", "--stride", "2", "examples/cat.png", "examples/ship.png",
                          "--model", str(checkpoint), "--out", str(tmp_path), "--json"], capsys)
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [(r["image"], r["k"]) for r in results] == [("examples/cat.png", 8), ("examples/cat.png", 12),
                                                       ("examples/ship.png", 8), ("examples/ship.png", 12)]
    lib = occlusion_map(str(checkpoint), "examples/cat.png", 8, stride=2, device="cpu")
    assert np.abs(np.array(results[0]["map"]) - lib.map).max() <= 1e-5
    assert results[0]["map_sum"] == pytest.approx(lib.map_sum, abs=1e-4)
    assert results[0]["most_damaging"]["row"] == lib.most_damaging["row"]
    for stem in ("cat", "ship"):
        assert (tmp_path / f"{stem}_occlusion.png").stat().st_size > 1000  # one figure per image, all K in it
        for k in (8, 12):
            saved = np.load(tmp_path / f"{stem}_k{k}.npy")
            assert saved.shape == ((32 - k) // 2 + 1,) * 2
            assert np.allclose(np.loadtxt(tmp_path / f"{stem}_k{k}.csv", delimiter=","), saved, atol=1e-5)


def test_dataset_slice_with_label(checkpoint, tmp_path, capsys):
    code, out, err = run(["occlude", "--k", "16", "--stride", "8", "--data", "synthetic", "--indices", "2:5",
                          "--label", "dog", "--mode", "dense", "--backend", "torch", "--model", str(checkpoint),
                          "--out", str(tmp_path), "--json", "--no-figures"], capsys)
    assert code == 0, err
    results = json.loads(out)["results"]
    assert len(results) == 3 and all(r["target"] == 5 and r["engine"]["mode"] == "dense" for r in results)
    assert len(list(tmp_path.glob("*.npy"))) == 3 and not list(tmp_path.glob("*.png"))


def test_table_goes_to_stderr(checkpoint, tmp_path, capsys):
    code, out, err = run(["occlude", "--k", "16", "--stride", "16", "examples/dog.png", "--model", str(checkpoint),
                          "--out", str(tmp_path)], capsys)
    assert code == 0 and out == "" and "map sum" in err


@pytest.mark.parametrize("args,message", [
    (["--k", "0"], "K must be"), (["--k", "33"], "K must be"), (["--stride", "0"], "stride"),
    (["--label", "unicorn"], "unknown class"), (["--baseline", "purple"], "baseline"),
    (["--mode", "fastest"], "mode"), (["--backend", "warp-drive"], "backend"),
])
def test_bad_options_exit_2(args, message, checkpoint, tmp_path, capsys):
    code, out, err = run(["occlude", "examples/cat.png", "--model", str(checkpoint), "--out", str(tmp_path), *args],
                         capsys)
    assert code == 2 and message in err and err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_bad_images_exit_2(checkpoint, tmp_path, capsys):
    from PIL import Image

    (tmp_path / "x.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    (tmp_path / "folder.png").mkdir()
    for path, message in ((tmp_path / "x.png", "not an image"), (tmp_path / "big.png", "--resize"),
                          (tmp_path / "none.png", "no such"), (tmp_path / "folder.png", "a folder")):
        code, _, err = run(["occlude", str(path), "--model", str(checkpoint), "--out", str(tmp_path)], capsys)
        assert code == 2 and message in err
    code, _, err = run(["occlude", "--k", "16", "--stride", "16", str(tmp_path / "big.png"), "--resize",
                        "--model", str(checkpoint), "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    code, _, err = run(["occlude", "--model", str(checkpoint)], capsys)
    assert code == 2 and "image files or --data" in err
    code, _, err = run(["occlude", "--data", "synthetic", "--indices", "-2:4", "--model", str(checkpoint), "--out",
                        str(tmp_path / "n")], capsys)
    assert code == 2 and "start at 0" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["occlude", "--data", "synthetic", "--indices", "0:100000", "--model", str(checkpoint),
                        "--out", str(tmp_path / "n")], capsys)
    assert code == 2 and "the split has" in err and len(err.strip().splitlines()) == 1


def test_int8_backend_runs_the_incremental_engine_on_its_convs(checkpoint, tmp_path, capsys):
    base = ["occlude", "--k", "8", "--stride", "3", "examples/cat.png", "--model", str(checkpoint), "--backend",
            "onnx-int8", "--calib-data", "synthetic", "--no-figures", "--json"]
    maps = {}
    for mode in ("incremental", "dense"):
        code, out, err = run(base + ["--mode", mode, "--out", str(tmp_path / mode)], capsys)
        assert code == 0, err
        result = json.loads(out)["results"][0]
        assert result["engine"]["mode"] == mode and result["engine"]["precision"] == "int8"
        maps[mode] = np.array(result["map"])
    assert np.abs(maps["incremental"] - maps["dense"]).max() <= 1e-3


def test_dataset_run_writes_a_page_a_grid_provenance_and_resumes(checkpoint, tmp_path, capsys):
    import re

    base = ["occlude", "--k", "16", "--stride", "16", "--data", "synthetic", "--indices", "0:3", "--model",
            str(checkpoint), "--backend", "torch", "--out", str(tmp_path), "--show", "drop", "--independent-scale"]
    code, out, err = run(base + ["--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    prov = doc["provenance"]
    assert prov["k"] == [16] and prov["stride"] == 16 and prov["mode"] == "auto"
    assert prov["command"].startswith("cifarbench occlude --k 16")  # the call itself, also in-process
    assert prov["engine"] == doc["engine"]["engine"] and prov["model"]["digest"] and prov["data"]["identity"]
    assert doc["maps_per_s"] > 0 and doc["engine"]["shards_resumed"] == 0
    assert [r["true"] is not None for r in doc["results"]] == [True] * 3
    page = (tmp_path / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert "grid.png" in sources and len(sources) == 4  # the grid and one figure per image
    assert all((tmp_path / s).stat().st_size > 1000 for s in sources)
    # the page's table shows the JSON's numbers (exact values in data-value)
    shown = [float(v) for v in re.findall(r'data-value="([^"]+)"', page)]
    for r in doc["results"]:
        assert r["clean_prob"] in shown and r["map_sum"] in shown
    # a rerun with --resume reads every finished shard and gives the same maps
    code, out, err = run(base + ["--json", "--resume"], capsys)
    assert code == 0, err
    again = json.loads(out)
    assert again["engine"]["shards_resumed"] == again["engine"]["shards"] >= 1
    for a, b in zip(doc["results"], again["results"]):
        assert a["map"] == b["map"]
    # the table names the prediction and the true label
    code, _, err = run(base, capsys)
    assert code == 0 and "predicted" in err and "true" in err and "maps/s" in err
