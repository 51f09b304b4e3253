"""INT8 export options (issue 15): ``--calib-method`` passed through to ONNX Runtime and recorded, the fp32-layer
report checked against an independent scan of the graph, ``--quantize-head``, progress callbacks, and the
one-line refusals. On the bundled net1 with a few images of the bundled calibration set (seconds)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cifarbench.artifacts import cached_artifact
from cifarbench.export import CALIB_METHODS, calibration_set
from cifarbench.export.int8 import even_batch, precision_report, quantize
from cifarbench.export.onnx import graph_precision, read_metadata
from cifarbench.runtime.ort import OrtRuntime
from cifarbench.source import resolve_source
from cli_helpers import assert_user_error, run_cli

#: not a multiple of the calibration batch (64): a short last batch, which the histogram calibrators choke on
N_CALIB = 70


@pytest.fixture(scope="module")
def net1():
    source = resolve_source("net1")
    proto = onnx.load(str(cached_artifact(source, "onnx")))
    return source, proto, calibration_set(source, N_CALIB)


@pytest.fixture(scope="module")
def quantized(net1):
    _, proto, images = net1
    return {m: quantize(proto, images, calibrate_method=m) for m in CALIB_METHODS}


def naive_fp32_layers(proto) -> list[tuple[str, str, str, int]]:
    """(node, op, weight, bytes) of every Conv/Gemm/MatMul whose weight input is a float32 initializer."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            w = inits.get(node.input[1])
            if w is not None and w.dtype == np.float32:
                out.append((node.name, node.op_type, node.input[1], w.nbytes))
    return out


def activation_scales(proto) -> dict[str, float]:
    """The scale of every activation QuantizeLinear (weights are stored quantized: no QuantizeLinear of theirs)."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in proto.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("method", list(CALIB_METHODS))
def test_each_method_gives_a_valid_int8_model_that_names_it(net1, quantized, method):
    source, _, images = net1
    q = quantized[method]
    onnx.checker.check_model(q, full_check=True)
    assert graph_precision(q) == "int8"
    meta = read_metadata(q)
    assert meta["calib_method"] == method and meta["calib_images"] == str(N_CALIB)
    rt = OrtRuntime(q, source=source)
    x = images[:16]
    out = rt.logits(x)
    with torch.no_grad():
        ref = source.torch_module()(x)
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.8  # a working model, not noise


def test_methods_really_differ(quantized):
    """The method reaches ONNX Runtime: percentile clips the top 0.001 % that MinMax covers, so its activation
    ranges are narrower on the same images. (ONNX Runtime's Entropy, with the 128/128 bins quantize_static gives
    it, has a single candidate threshold, the full range: its ranges are MinMax's, never wider.)"""
    scales = {m: activation_scales(q) for m, q in quantized.items()}
    assert scales["minmax"].keys() == scales["entropy"].keys() == scales["percentile"].keys()
    assert any(scales["percentile"][k] < scales["minmax"][k] * (1 - 1e-3) for k in scales["minmax"])
    assert all(scales[m][k] <= scales["minmax"][k] * (1 + 1e-5) for m in ("entropy", "percentile")
               for k in scales["minmax"])


def test_fp32_layers_match_an_independent_scan(net1, quantized):
    _, proto, images = net1
    head = quantize(proto, images, keep_head=False)
    everything = quantize(proto, images, keep_first_conv=False, keep_head=False, keep_logits=False)
    for q in (quantized["minmax"], head, everything):
        report = precision_report(q)
        assert [(x["name"], x["op"], x["weight"], x["weight_bytes"]) for x in report["fp32_layers"]] == \
            naive_fp32_layers(q)
        by_type = {"int8": 0, "fp32": 0, "other": 0}
        for t in q.graph.initializer:
            a = numpy_helper.to_array(t)
            by_type["int8" if a.dtype in (np.int8, np.uint8) else "fp32" if a.dtype == np.float32 else "other"] \
                += a.nbytes
        assert report["bytes"] == by_type
    # by hand, from net1's shapes (conv1 18x3x3x3; conv2 gives 36x6x6 after two pools, so FC 1296->120->84->10)
    default = precision_report(quantized["minmax"])["fp32_layers"]
    assert [x["weight_bytes"] for x in default] == [18 * 27 * 4, 1296 * 120 * 4, 120 * 84 * 4, 84 * 10 * 4]
    assert [x["op"] for x in default] == ["Conv", "Gemm", "Gemm", "Gemm"]
    assert "first conv" in default[0]["why"] and all("head" in x["why"] for x in default[1:])
    kept = precision_report(head)["fp32_layers"]
    assert [x["weight_bytes"] for x in kept] == [18 * 27 * 4, 84 * 10 * 4] and "logits" in kept[1]["why"]
    assert precision_report(everything)["fp32_layers"] == []


def test_calibration_progress_counts_every_image(net1):
    _, proto, images = net1
    for method in ("minmax", "entropy"):
        calls = []
        quantize(proto, images, calibrate_method=method, progress=lambda done, total: calls.append((done, total)))
        assert calls[-1] == (N_CALIB, N_CALIB) and all(t == N_CALIB for _, t in calls)
        assert [d for d, _ in calls] == sorted({d for d, _ in calls})  # strictly increasing


def test_even_batch_divides():
    for n in (1, 7, 64, 70, 128, 250, 251, 512):
        b = even_batch(n)
        assert n % b == 0 and b <= 64
        assert not any(n % c == 0 for c in range(b + 1, min(64, n) + 1))  # the largest such


def test_method_and_head_are_in_the_cache_key(net1):
    source = net1[0]
    paths = {(m, h): cached_artifact(source, "onnx-int8", calib=N_CALIB, calib_method=m, quantize_head=h)
             for m, h in (("minmax", False), ("percentile", False), ("minmax", True))}
    assert len(set(paths.values())) == 3
    for (m, h), path in paths.items():
        meta = read_metadata(onnx.load(str(path)))
        assert meta["calib_method"] == m and meta["quantize_head"] == ("true" if h else "false")
    # the default is minmax with an fp32 head: the same cache entry as naming them
    assert cached_artifact(source, "onnx-int8", calib=N_CALIB) == paths[("minmax", False)]


def test_export_json_names_method_and_fp32_layers(capsys, tmp_path):
    out = tmp_path / "q.onnx"
    code, stdout, err = run_cli(capsys, "export", "net1", "--to", "onnx-int8", "--out", out, "--calib",
                                str(N_CALIB), "--calib-method", "percentile", "--quantize-head", "--eval-images",
                                "0", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    proto = onnx.load(str(out))
    assert doc["calibration"]["method"] == "percentile" == read_metadata(proto)["calib_method"]
    assert doc["calibration"]["images"] == N_CALIB
    q = doc["quantization"]
    assert q["calib_method"] == "percentile" and q["quantize_head"] is True
    assert [(x["name"], x["op"], x["weight"], x["weight_bytes"]) for x in q["fp32_layers"]] == \
        naive_fp32_layers(proto)
    assert q["bytes"]["int8"] > q["bytes"]["fp32"]  # the head's 0.6 MB FC1 is int8 now


def test_export_prints_fp32_layers_and_accuracy(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "net1", "--to", "onnx-int8", "--out", tmp_path / "q.onnx", "--calib",
                           str(N_CALIB), "--data", "synthetic", "--eval-images", "50")
    assert code == 0, err
    assert "calibration: minmax on 70 images" in err
    assert "4 layers with fp32 weights" in err and "head.1.weight" in err
    assert "0.62 MB" in err and "test accuracy on 50 images" in err


@pytest.mark.parametrize("args, match", [
    (("--to", "onnx-int8", "--calib-method", "kl"), "choose one of minmax, entropy, percentile"),
    (("--to", "onnx", "--calib-method", "entropy"), "--to onnx-int8"),
    (("--to", "onnx", "--quantize-head"), "--to onnx-int8"),
])
def test_bad_calibration_options_are_one_line(capsys, tmp_path, args, match):
    assert_user_error(capsys, "export", "net1", "--out", tmp_path / "q.onnx", *args, match=match)
    assert not (tmp_path / "q.onnx").exists()


def test_accuracy_report_progress_counts_both_models(net1):
    from cifarbench.artifacts import int8_accuracy_report

    source = net1[0]
    path = cached_artifact(source, "onnx-int8", calib=N_CALIB)
    calls = []
    report = int8_accuracy_report(source, path, "synthetic", limit=60, batch=25,
                                  progress=lambda done, total: calls.append((done, total)))
    assert report["images"] == 60
    assert calls == [(25, 120), (50, 120), (60, 120), (85, 120), (110, 120), (120, 120)]


def test_the_cuda_probe_line_is_dropped_and_nothing_else():
    import logging

    from cifarbench.console import quiet_cuda_probe

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("torch.utils.cpp_extension")
    handler = Keep()
    logger.addHandler(handler)
    try:
        quiet_cuda_probe()
        quiet_cuda_probe()  # idempotent: one filter
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error checking compiler version for %s", "c++")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Error checking compiler version for c++"]
    assert len([f for f in logger.filters if getattr(f, "__name__", "") == "_no_cuda_runtime"]) == 1
