"""Export layer: ONNX (metadata, dynamic batch, checker), INT8 ONNX (QDQ per-channel, calibration), AOTInductor,
and the artifact cache; every artifact is run by its real runtime and compared with torch."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from cifarbench.errors import UserError
from cifarbench.artifacts import cached_artifact
from cifarbench.export import export
from cifarbench.export.onnx import load_onnx, model_digest, read_metadata
from cifarbench.runtime.ort import OrtRuntime
from conftest import random_model
from runtime_helpers import fitted_model, sample_images

@pytest.fixture(scope="module", params=["net1", "net4"])
def onnx_export(request):
    model = fitted_model(request.param)
    return model, cached_artifact(model, "onnx")


def test_onnx_metadata_and_graph(onnx_export, tmp_path):
    model, _ = onnx_export
    # a fresh export: the shared cache may hold the same weights exported earlier from a checkpoint file
    proto = load_onnx(export(model, "onnx", out=tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    meta = read_metadata(proto)
    assert meta["net"] == model.name and meta["precision"] == "fp32"
    assert meta["source_sha256"] == meta["weights_sha256"] == model_digest(model)  # in memory: no source file
    assert len(meta["source_sha256"]) == 64
    import json

    assert json.loads(meta["hparams"]) == model.hparams
    assert json.loads(meta["classes"])[3] == "cat"
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "images" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [o.name for o in proto.graph.output] == ["logits"]


@pytest.mark.parametrize("n", [1, 7, 64])
def test_onnx_dynamic_batch_matches_torch(onnx_export, n):
    model, path = onnx_export
    x = sample_images()[:n]
    with torch.no_grad():
        ref = model(x)
    out = OrtRuntime(path).logits(x)
    assert out.shape == (n, 10)
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())  # fp32 parity, scaled to the logits


def test_digest_tracks_weights_and_metadata_names_the_source_file(tmp_path):
    from cifarbench.checkpoint import file_sha256, save_checkpoint
    from cifarbench.export.onnx import model_metadata
    from cifarbench.zoo import load_model

    a, b = random_model("net1", 0), random_model("net1", 1)
    assert model_digest(a) == model_digest(random_model("net1", 0)) != model_digest(b)
    save_checkpoint(tmp_path / "a.safetensors", a, {"net": "net1", "hparams": a.hparams})
    loaded = load_model(tmp_path / "a.safetensors")
    assert model_digest(loaded) == model_digest(a)  # same weights, same cache entry
    meta = model_metadata(loaded)
    assert meta["source_sha256"] == file_sha256(tmp_path / "a.safetensors")
    assert meta["weights_sha256"] == model_digest(a)
    with torch.no_grad():
        loaded.layers.conv1.conv.weight[0] = 0  # changed in memory: no longer the checkpoint's cache entry
    assert model_digest(loaded) != model_digest(a)


def test_cache_exports_once():
    model = fitted_model("net1")
    first = cached_artifact(model, "onnx")
    stamp = first.stat().st_mtime_ns
    assert cached_artifact(model, "onnx") == first and first.stat().st_mtime_ns == stamp
    assert first.parent.name == model_digest(model)[:16]


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_damaged_cached_artifact_is_rebuilt_with_one_warning(damage, capsys):
    from cifarbench.io import file_sha256

    model = random_model("net1", l1_oc=3)
    path = cached_artifact(model, "onnx")
    good = file_sha256(path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # same length, one weight byte changed: loads fine, computes something else
        path.write_bytes(data[:-200] + bytes([data[-200] ^ 1]) + data[-199:])
    capsys.readouterr()
    assert cached_artifact(model, "onnx") == path
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "rebuilding" in warnings[0]
    assert file_sha256(path) == good  # the export is deterministic: the rebuilt file is the original


def test_a_failed_export_is_one_warning_line_and_nothing_else(capfd):
    """torch.export logs tracebacks and graphs when it fails; ``auto`` falls back to torch with one line naming the
    reason (the innermost cause, no colour codes), and nothing else reaches the terminal."""
    from cifarbench.artifacts import open_runtime

    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 10)

        def forward(self, x):
            y = self.conv(x).relu().mean((2, 3))
            if float(y.sum()) > 0:
                y = y * 2
            return self.fc(y)

    torch.manual_seed(0)
    capfd.readouterr()
    runtime = open_runtime(DataDependent(), "auto", device="cpu")
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert runtime.name == "torch" and out == ""
    assert len(lines) == 1 and lines[0].startswith("warning: cannot export") and "\x1b" not in lines[0], err
    assert "data-dependent" in lines[0] and lines[0].endswith("running it on torch instead")


def test_an_export_its_own_checker_refuses_falls_back_to_torch(capfd):
    """torch's exporter writes ceil-mode pools with padding whose shapes ONNX's checker refuses (9 vs 8): under
    ``auto`` that is one warning and the torch runtime, not a traceback."""
    from cifarbench.artifacts import open_runtime

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.AvgPool2d(2, 2, padding=1,
                                                                                     ceil_mode=True),
                                torch.nn.Conv2d(4, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))  # the lazy layer takes its size
    capfd.readouterr()
    runtime = open_runtime(model.eval(), "auto", device="cpu")
    err = capfd.readouterr().err
    assert runtime.name == "torch"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: cannot export") and "checker" in lines[0], err


def test_export_writes_out_path(tmp_path):
    out = export(random_model("net1"), to="onnx", out=tmp_path / "sub" / "m.onnx")
    assert out.is_file() and read_metadata(load_onnx(out))["net"] == "net1"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # atomic write left no temp file


def test_calibration_reader_covers_images_once():
    from cifarbench.export.int8 import ImageCalibrationReader

    images = torch.rand(150, 3, 32, 32)
    reader = ImageCalibrationReader(images, "images", batch=64)
    chunks = []
    while (item := reader.get_next()) is not None:
        chunks.append(item["images"])
    assert [len(c) for c in chunks] == [64, 64, 22]
    np.testing.assert_array_equal(np.concatenate(chunks), images.numpy())
    reader.rewind()
    assert len(reader.get_next()["images"]) == 64


def test_calibration_images_are_seeded_training_images():
    from cifarbench.data import load_split
    from cifarbench.export.int8 import calibration_images

    a, b = calibration_images("synthetic", 40, seed=1), calibration_images("synthetic", 40, seed=1)
    torch.testing.assert_close(a, b)
    train = load_split("synthetic", "train").float_images()
    # every calibration image is one of the training images (naive search)
    assert all(((train - img).abs().amax((1, 2, 3)) == 0).any() for img in a[:5])
    assert not torch.equal(a, calibration_images("synthetic", 40, seed=2))
    with pytest.raises(UserError):
        calibration_images("synthetic", 0)


@pytest.fixture(scope="module", params=["net1", "net4"])
def int8_export(request):
    model = fitted_model(request.param)
    return model, cached_artifact(model, "onnx-int8", calib=128, calib_data="synthetic")


def test_int8_is_qdq_per_channel_with_first_conv_and_head_fp32(int8_export):
    model, path = int8_export
    proto = load_onnx(path)
    meta = read_metadata(proto)
    assert meta["precision"] == "int8" and meta["calib_images"] == "128" and meta["net"] == model.name
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {i.name: i for i in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    blocks = list(model.conv_blocks().values())
    assert len(convs) == len(blocks)
    producers = {o: n for n in proto.graph.node for o in n.output}
    first_weight = convs[0].input[1]
    assert first_weight in inits and onnx.numpy_helper.to_array(inits[first_weight]).dtype == np.float32
    for conv, block in zip(convs[1:], blocks[1:]):
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]])
        assert scale.shape == (block.conv.out_channels,)  # one scale per output channel
        assert onnx.numpy_helper.to_array(inits[dq.input[0]]).dtype == np.int8
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 3
    for gemm in gemms:  # the head stays fp32: its weights are plain float initializers
        assert onnx.numpy_helper.to_array(inits[gemm.input[1]]).dtype == np.float32


def test_int8_agrees_with_fp32(int8_export):
    model, path = int8_export
    x = sample_images()
    rt = OrtRuntime(path)
    assert rt.name == "onnx-int8" and rt.precision == "int8"
    with torch.no_grad():
        ref = model(x)
    out = rt.logits(x)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.99
    assert (out - ref).abs().max() > 1e-6  # it really is a different (quantized) computation


def test_int8_refuses_a_quantized_source(int8_export):
    from cifarbench.export.int8 import quantize

    with pytest.raises(UserError, match="fp32"):
        quantize(load_onnx(int8_export[1]), torch.rand(4, 3, 32, 32))


def test_int8_of_a_net_with_nothing_to_quantize_is_refused(tmp_path):
    """conv -> relu -> pool -> fc: the first conv and the head stay fp32 by default, so there is no int8 layer
    left; the file would be fp32 labelled int8."""
    from cifarbench.export.int8 import export_int8

    class Gated(torch.nn.Module):  # activations ONNX Runtime wraps in Q/DQ pairs, but still no int8 weight
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(4 * 16 * 16, 10)

        def forward(self, x):
            y = torch.nn.functional.max_pool2d(self.conv(x), 2)
            return self.fc((y + torch.sigmoid(y)).flatten(1))

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 10)).eval()
    for model in (plain, Gated().eval()):
        with pytest.raises(UserError, match="nothing in the model could be quantized"):
            export_int8(model, tmp_path / "q.onnx", torch.rand(16, 3, 32, 32))
        assert not (tmp_path / "q.onnx").exists()


def test_int8_accuracy_report_counts_like_naive():
    from cifarbench.data import load_split
    from cifarbench.artifacts import int8_accuracy_report

    model = fitted_model("net1")
    path = cached_artifact(model, "onnx-int8", calib=128, calib_data="synthetic")
    report = int8_accuracy_report(model, path, "synthetic", limit=120, batch=50)
    test = load_split("synthetic", "test").subset(slice(0, 120))
    preds = OrtRuntime(path).logits(test.float_images()).argmax(1)
    assert report["images"] == 120
    assert report["int8"] == pytest.approx(sum(int(p == y) for p, y in zip(preds, test.labels)) / 120)
    assert report["drop"] == pytest.approx(report["fp32"] - report["int8"])


def test_load_onnx_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="no such"):
        load_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(UserError, match="corrupt"):
        load_onnx(bad)
    with pytest.raises(UserError, match="corrupt"):
        OrtRuntime(b"garbage bytes")


def test_unknown_target():
    with pytest.raises(UserError, match="unknown export target"):
        export(random_model("net1"), to="tflite")
