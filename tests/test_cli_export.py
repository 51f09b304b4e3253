"""``cifarbench export``, ``verify`` and ``bench`` end to end, in-process, with their JSON and their errors."""
from __future__ import annotations

import json

import pytest

from cifarbench.checkpoint import save_checkpoint
from cifarbench.nets import normalize
from cli_helpers import assert_user_error, run_cli
from conftest import random_model
from runtime_helpers import fitted_model

def checkpoint(tmp_path_factory, model, name):
    path = tmp_path_factory.mktemp("ckpt") / f"{name}.safetensors"
    save_checkpoint(path, model, {"net": model.name, "hparams": model.hparams})
    return path


@pytest.fixture(scope="module")
def net1_ckpt(tmp_path_factory):
    return checkpoint(tmp_path_factory, fitted_model("net1"), "net1")


def test_export_onnx_json(capsys, net1_ckpt, tmp_path):
    from cifarbench.checkpoint import file_sha256
    from cifarbench.export.onnx import load_onnx, read_metadata

    code, out, _ = run_cli(capsys, "export", net1_ckpt, "--to", "onnx", "--out", tmp_path / "m.onnx", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["artifact"] == str(tmp_path / "m.onnx") and result["precision"] == "fp32"
    assert result["sha256"] == file_sha256(tmp_path / "m.onnx")
    assert read_metadata(load_onnx(tmp_path / "m.onnx"))["source_sha256"] == file_sha256(net1_ckpt)


def test_export_int8_reports_accuracy(capsys, net1_ckpt, tmp_path):
    code, out, _ = run_cli(capsys, "export", net1_ckpt, "--to", "onnx-int8", "--out", tmp_path / "q.onnx",
                           "--data", "synthetic", "--calib", "64", "--eval-images", "100", "--json")
    assert code == 0
    acc = json.loads(out)["accuracy"]
    assert acc["images"] == 100 and 0 <= acc["int8"] <= 1 and acc["fp32"] > 0.5
    assert acc["drop"] == pytest.approx(acc["fp32"] - acc["int8"])
    # an int8 ONNX file runs only on ONNX Runtime here: the reference and the onnx-int8 row would be one session,
    # a comparison of nothing with itself (tests/test_verify_onnx_default.py: no torch/aoti rows for an ONNX file)
    assert_user_error(capsys, "verify", tmp_path / "q.onnx", "--data", "synthetic", "--images", "8",
                      match="nothing to compare")


def test_verify_passes_json(capsys, net1_ckpt):
    code, out, err = run_cli(capsys, "verify", net1_ckpt, "--backends", "torch,onnxruntime,onnx-int8",
                             "--data", "synthetic", "--images", "200", "--calib", "128", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] and report["images"] == 200
    assert [(r["backend"], r["precision"]) for r in report["results"]] == [
        ("torch", "fp32"), ("onnxruntime", "fp32"), ("onnx-int8", "int8")]
    assert all(r["top1_agreement"] >= 0.99 for r in report["results"])


def test_verify_fails_with_exit_1(capsys, tmp_path_factory):
    """A random body with a readout that amplifies tiny feature differences: int8 cannot keep its top-1."""
    model = random_model("net1")
    import torch

    from cifarbench.data import load_split

    with torch.no_grad():
        x = load_split("synthetic", "test").float_images()[:256]
        feats = model.head[:-1](model.layers(normalize(x)))
        last = model.head[-1]
        last.weight.mul_(3.0 / ((feats - feats.mean(0)) @ last.weight.T).std(0)[:, None])
        last.bias.copy_(-(feats @ last.weight.T).mean(0))
    ckpt = checkpoint(tmp_path_factory, model, "touchy")
    code, out, err = run_cli(capsys, "verify", ckpt, "--backends", "onnxruntime,onnx-int8", "--data", "synthetic",
                             "--images", "400", "--calib", "64", "--json")
    report = json.loads(out)
    assert code == 1 and not report["passed"]
    fp32, int8 = report["results"]
    assert fp32["passed"] and not int8["passed"] and int8["top1_agreement"] < 0.99


def test_bench_run_render_and_compare(capsys, net1_ckpt, tmp_path):
    path = tmp_path / "run.json"
    code, out, _ = run_cli(capsys, "bench", net1_ckpt, "--backends", "torch,onnxruntime", "--batch", "1,8",
                           "--iters", "3", "--warmup", "1", "--device", "cpu", "--out", path, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc == json.loads(path.read_text())
    assert [(r["backend"], r["batch"]) for r in doc["results"]] == [("torch", 1), ("torch", 8), ("onnxruntime", 1),
                                                                     ("onnxruntime", 8)]
    from cifarbench.nets import count_flops

    for r in doc["results"]:
        lat = r["latency_ms"]
        assert r["iters"] >= 3 and lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["images_per_s"] == pytest.approx(r["batch"] / (lat["mean"] / 1e3))
        assert r["gflops"] == pytest.approx(count_flops(fitted_model("net1")) * r["images_per_s"] / 1e9)
    code, report, _ = run_cli(capsys, "bench", "--from", path)  # a rendered report is the result: stdout
    assert code == 0 and "net1 on" in report and "torch" in report
    faster = json.loads(path.read_text())
    for r in faster["results"]:
        r["images_per_s"] *= 2
        r["latency_ms"]["p50"] /= 2
    other = tmp_path / "other.json"
    other.write_text(json.dumps(faster))
    code, out, _ = run_cli(capsys, "bench", "--from", path, "--compare", other, "--json")
    rows = json.loads(out)["rows"]
    assert code == 0 and len(rows) == 4
    assert all(r["speedup"] == pytest.approx(2) and r["p50_ratio"] == pytest.approx(0.5) for r in rows)


def test_percentile_matches_numpy():
    import numpy as np

    from cifarbench.timing import percentile

    values = list(np.random.default_rng(0).random(37))
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


@pytest.mark.parametrize("args, match", [
    (("export", "net9", "--to", "onnx"), "no such net or checkpoint: net9"),
    (("export", "missing.safetensors"), "no such net or checkpoint"),
    (("export", "{ckpt}", "--to", "tflite"), "unknown export target"),
    (("export", "{ckpt}", "--to", "onnx", "--int8"), "--int8"),
    (("export", "{ckpt}", "--to", "tensorrt", "--device", "cpu"), "TensorRT"),
    (("export", "{ckpt}", "--to", "aoti", "--out", "g.onnx"), "is a .pt2 file; name it g.pt2"),
    (("export", "{ckpt}", "--to", "onnx", "--out", "g.pt2"), "is a .onnx file"),
    (("verify", "{ckpt}", "--backends", "torch,tflite", "--data", "synthetic"), "unknown backend"),
    (("verify", "{ckpt}", "--backends", "torch:fp64", "--data", "synthetic"), "unknown precision"),
    (("verify", "{ckpt}", "--images", "0", "--data", "synthetic"), "--images"),
    (("bench", "{ckpt}", "--batch", "1,x"), "--batch"),
    (("bench", "{ckpt}", "--batch", "0"), "positive"),
    (("bench",), "give a MODEL"),
    (("bench", "--from", "nowhere.json"), "no such benchmark results"),
    (("bench", "{ckpt}", "--compare", "nowhere.json"), "--compare needs --from"),
    (("bench", "--from", "{notjson}"), "not valid JSON"),
    (("bench", "--from", "{otherjson}"), "not a cifarbench bench result"),
    (("bench", "{ckpt}", "--backends", "torch:fp16", "--device", "cpu"), "CUDA"),
])
def test_user_errors(capsys, net1_ckpt, tmp_path, args, match):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"results": []}))
    subs = {"{ckpt}": str(net1_ckpt), "{notjson}": str(tmp_path / "bad.json"),
            "{otherjson}": str(tmp_path / "other.json")}
    assert_user_error(capsys, *[subs.get(a, a) for a in args], match=match)
