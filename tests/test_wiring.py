"""The commands wired to provenance, the HTML page and Ray: what a user reads in the JSON and the page equals the
result, names the model, data and what changed; a sharded run on Ray equals the local one."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cifarbench.checkpoint import file_sha256, save_checkpoint
from cli_helpers import assert_user_error, run_cli
from runtime_helpers import fitted_model
from test_outputs_publish import _Page

DATA = ("--data", "synthetic:200")   # 40 test images


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = fitted_model("net1")
    path = tmp_path_factory.mktemp("ckpt") / "net1.safetensors"
    save_checkpoint(path, model, {"net": "net1", "hparams": model.hparams})
    return path


def _page(folder: Path) -> _Page:
    page = folder / "index.html"
    assert page.is_file()
    doc = _Page()
    doc.feed(page.read_text())
    for src in doc.images:  # every figure the page shows lies beside it (or is embedded)
        assert src.startswith("data:image/png;base64,") or (folder / src).is_file(), src
    return doc


def _shown(doc: _Page) -> list[float]:
    return [json.loads(v) for v, _ in doc.numbers]


def _check_provenance(prov: dict, ckpt: Path, command: str):
    assert prov["command"].startswith(f"cifarbench {command} ") and str(ckpt) in prov["command"]
    assert prov["model"]["name"] == "net1" and prov["model"]["digest"]
    assert prov["data"]["identity"] == "synthetic:200:test" and prov["data"]["images"] == 40
    assert prov["backend"] == "torch" and prov["precision"] == "fp32" and prov["device"] == "cpu"
    assert prov["cifarbench"] and prov["date"].endswith("Z")


def test_eval_json_carries_provenance_and_its_page_shows_the_json_numbers(ckpt, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, err = run_cli(capsys, "eval", ckpt, *DATA, "--backend", "torch", "--device", "cpu", "--out", out,
                                "--json")
    assert code == 0, err
    result = json.loads(stdout)
    _check_provenance(result["provenance"], ckpt, "eval")
    assert json.loads((out / "eval.json").read_text()) == result
    doc = _page(out)
    assert doc.result == result
    # the page's tables: per-class accuracy then overall, then the confusion counts, each exactly the JSON's
    want = [v for v in result["per_class"].values() if v is not None] + [result["accuracy"]]
    want += [c for row in result["confusion"] for c in row]
    assert _shown(doc) == want
    assert "confusion.png" in doc.images


def test_ablate_json_names_the_filters_and_the_sign_of_the_difference(ckpt, tmp_path, capsys):
    out = tmp_path / "ablate"
    code, stdout, err = run_cli(capsys, "ablate", ckpt, "conv2:0", "conv1:1", *DATA, "--backend", "torch",
                                "--device", "cpu", "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    prov = result["provenance"]
    _check_provenance(prov, ckpt, "ablate")
    assert prov["filters"] == "conv1:1 conv2:0" and prov["difference"] == "before − after"
    d = result["difference"]
    assert d["accuracy"] == pytest.approx(result["before"]["accuracy"] - result["after"]["accuracy"])
    doc = _page(out)
    assert doc.result == result
    b, a = result["before"], result["after"]
    want = []
    for c in b["per_class"]:
        want += [v for v in (b["per_class"][c], a["per_class"][c], d["per_class"][c]) if v is not None]
    want += [b["accuracy"], a["accuracy"], d["accuracy"]]
    assert _shown(doc) == want
    assert {"confusion.png"} <= set(doc.images)


def test_bench_run_has_provenance_and_a_page_beside_it(ckpt, tmp_path, capsys):
    path = tmp_path / "run.json"
    code, stdout, err = run_cli(capsys, "bench", ckpt, "--backends", "torch", "--batch", "2", "--iters", "2",
                                "--warmup", "0", "--device", "cpu", "--out", path, "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["provenance"]["model"]["digest"] == doc["provenance"]["model"]["digest"] and \
        doc["provenance"]["backend"] == "torch:fp32"
    page = _Page()
    page.feed((tmp_path / "run.html").read_text())
    assert page.result == doc


def test_resume_without_out_is_one_line(ckpt, capsys):
    assert_user_error(capsys, "mine", ckpt, "conv1:0", *DATA, "--resume", match="--resume needs --out")
    assert_user_error(capsys, "ablate", ckpt, "--sweep", "conv1", *DATA, "--executor", "spark", match="local or ray")


def test_data_default_comes_from_cifarbench_data(ckpt, capsys, monkeypatch):
    monkeypatch.setenv("CIFARBENCH_DATA", "synthetic:200")
    code, stdout, err = run_cli(capsys, "eval", ckpt, "--backend", "torch", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(stdout)["data"] == "synthetic:200:test"


# ------------------------------------------------------------------------------------------------ Ray
def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "provenance"}


def test_ablate_sweep_on_ray_equals_local(ckpt, tmp_path, capsys, ray_cluster):
    args = ("ablate", ckpt, "--sweep", "conv1", *DATA, "--backend", "torch", "--device", "cpu", "--batch-size", "10")
    code, local, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    out = tmp_path / "ray"
    code, remote, err = run_cli(capsys, *args, "--executor", "ray", "--out", out, "--json")
    assert code == 0, err
    assert _strip(json.loads(remote)) == _strip(json.loads(local))
    assert json.loads(remote)["provenance"]["executor"] == "ray"
    shards = sorted((out / "shards").glob("ablation-*.npz"))
    assert shards and (out / "index.html").is_file()
    # --resume reads every finished shard and computes nothing: the shard files are not rewritten
    before = {p: file_sha256(p) for p in shards}
    code, again, err = run_cli(capsys, *args, "--executor", "ray", "--out", out, "--resume", "--json")
    assert code == 0, err
    assert "0 computed" in err and _strip(json.loads(again)) == _strip(json.loads(local))
    assert {p: file_sha256(p) for p in shards} == before


def test_mine_on_ray_equals_local(ckpt, tmp_path, capsys, ray_cluster):
    args = ("mine", ckpt, "conv1:0-3", "conv2:1", *DATA, "--top", "5", "--backend", "torch", "--device", "cpu",
            "--batch-size", "10")
    code, local, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    code, remote, err = run_cli(capsys, *args, "--executor", "ray", "--json")
    assert code == 0, err
    a, b = json.loads(local), json.loads(remote)
    assert [[t["index"] for t in f["top"]] for f in a["filters"]] == [[t["index"] for t in f["top"]]
                                                                       for f in b["filters"]]
    assert _strip(a) == _strip(b)
    np.testing.assert_equal(b["provenance"]["filters"], "conv1:0,1,2,3 conv2:1")


def test_mine_of_an_onnx_file_in_shards_equals_the_unsharded_run(ckpt, tmp_path, capsys):
    """Shards open the model source: an ONNX file (no torch module) mines through its graph there too."""
    import torch

    from cifarbench.source import resolve_source

    onnx_file = tmp_path / "net1.onnx"
    module = resolve_source(ckpt).torch_module()
    torch.onnx.export(module, (torch.zeros(2, 3, 32, 32),), str(onnx_file), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    args = ("mine", onnx_file, "--all", *DATA, "--top", "3", "--batch-size", "10", "--show", "0")
    code, whole, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    code, sharded, err = run_cli(capsys, *args, "--out", tmp_path / "out", "--resume", "--json")
    assert code == 0, err
    assert list((tmp_path / "out" / "shards").glob("mining-*.npz"))
    assert _strip(json.loads(sharded)) == _strip(json.loads(whole))


def test_int8_export_of_a_zoo_net_calibrates_offline_on_the_bundled_set(tmp_path, capsys, monkeypatch):
    """No --calib-data, no $CIFARBENCH_CALIB_DATA, no network: the bundled CIFAR-10 images calibrate it."""
    import onnx

    from cifarbench.data import bundled_calibration

    monkeypatch.delenv("CIFARBENCH_CALIB_DATA", raising=False)
    monkeypatch.setenv("CIFARBENCH_DATA_DIR", str(tmp_path / "empty"))  # nothing cached to download from
    code, stdout, err = run_cli(capsys, "export", "net1", "--to", "onnx-int8", "--out", tmp_path / "q.onnx",
                                "--calib", "16", "--eval-images", "0", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["calibration"]["data"] == "bundled calibration set" and result["provenance"]["backend"] == \
        "onnx-int8"
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "q.onnx")).metadata_props}
    assert meta["cifarbench.calib_images"] == "16" and len(bundled_calibration()) >= 16


def test_verify_shows_each_backends_bounds_and_writes_its_page(ckpt, tmp_path, capsys):
    out = tmp_path / "verify"
    code, stdout, err = run_cli(capsys, "verify", ckpt, "--backends", "onnxruntime", *DATA, "--images", "20",
                                "--out", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    (row,) = report["results"]
    assert row["tolerance"] == {"atol": 1e-4, "rtol": 1e-4, "top1": 0.99}  # fp32's default bounds
    assert report["provenance"]["data"]["images"] == 20 and "torch fp32" in report["provenance"]["reference"]
    doc = _page(out)
    assert doc.result == report
    assert _shown(doc) == [row[k] for k in ("logits_max_abs", "logits_max_rel", "probs_max_abs", "top1_agreement")] \
        + [1e-4, 1e-4, 0.99]
