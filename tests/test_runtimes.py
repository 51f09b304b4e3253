"""Runtimes behind ``open_runtime``: each CPU backend on net1 and net4 against torch fp32, backend resolution,
artifacts, batch splitting and bad input; CUDA paths run where a GPU is present."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cifarbench.errors import UserError
from cifarbench.artifacts import cached_artifact
from cifarbench.parity import error_metrics, judge
from cifarbench.runtime import TorchRuntime, open_runtime, resolve_backend
from cifarbench.runtime.ort import OrtRuntime
from runtime_helpers import fitted_model, sample_images

CPU = torch.device("cpu")
CALIB = {"calib": 128, "calib_data": "synthetic"}

def reference(model, x):
    with torch.no_grad():
        return model(x)


def assert_parity(rt, model, x, precision="fp32"):
    metrics = error_metrics(reference(model, x), rt.logits(x))
    passed, failures = judge(metrics, precision)
    assert passed, (rt, failures)
    return metrics


@pytest.mark.parametrize("net", ["net1", "net4"])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "onnx-int8"])
def test_cpu_backends_match_torch(net, backend):
    model = fitted_model(net)
    rt = open_runtime(model, backend, device="cpu", **CALIB)
    assert rt.name == backend and rt.net == net and rt.device == CPU
    assert_parity(rt, model, sample_images(), rt.precision)


@pytest.fixture(scope="module")
def aoti_net1():
    return cached_artifact(fitted_model("net1"), "aoti", device="cpu")


def test_aoti_runtime(aoti_net1):
    model = fitted_model("net1")
    rt = open_runtime(model, "aoti", device="cpu")
    assert rt.name == "aoti" and rt.net == "net1" and rt.metadata["device"] == "cpu"
    for n in (1, 13):  # the package has a dynamic batch dimension
        assert_parity(rt, model, sample_images()[:n])
    assert open_runtime(aoti_net1).name == "aoti"  # the .pt2 path opens with its backend


def test_aoti_refuses_other_device_and_corrupt_package(aoti_net1, tmp_path):
    from cifarbench.runtime.aoti import AotiRuntime

    with pytest.raises(UserError, match="compiled for cpu"):
        AotiRuntime(aoti_net1, device="cuda")
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="corrupt"):
        open_runtime(bad)
    with pytest.raises(UserError, match="no such"):
        open_runtime(tmp_path / "missing.pt2")


def test_torch_compile_runtime():
    model = fitted_model("net1")
    rt = open_runtime(model, "torch-compile", device="cpu")
    assert rt.name == "torch-compile" and rt.mode == "default"
    assert_parity(rt, model, sample_images()[:32])


def test_auto_is_onnxruntime_on_cpu():
    assert resolve_backend("auto", CPU) == "onnxruntime"
    rt = open_runtime(fitted_model("net1"), "auto", device="cpu")
    assert isinstance(rt, OrtRuntime) and rt.precision == "fp32"


def test_resolve_backend_for_artifacts():
    assert resolve_backend("auto", CPU, ".onnx") == "onnxruntime"
    assert resolve_backend("auto", CPU, ".pt2") == "aoti"
    assert resolve_backend("auto", CPU, ".engine") == "tensorrt"
    assert resolve_backend("onnx-int8", CPU, ".onnx") == "onnx-int8"
    with pytest.raises(UserError, match="runs with --backend aoti"):
        resolve_backend("onnxruntime", CPU, ".pt2")
    with pytest.raises(UserError, match="unknown backend"):
        resolve_backend("tflite", CPU)


def test_open_onnx_artifacts():
    model = fitted_model("net1")
    fp32, int8 = cached_artifact(model, "onnx"), cached_artifact(model, "onnx-int8", **CALIB)
    assert open_runtime(fp32, device="cpu").name == "onnxruntime"
    assert open_runtime(int8, device="cpu").name == "onnx-int8"
    assert open_runtime(int8, "onnx-int8", device="cpu").precision == "int8"
    # an fp32 file on the int8 backend is quantized (calibrated through its contract), not refused
    assert open_runtime(fp32, "onnx-int8", device="cpu", **CALIB).precision == "int8"
    with pytest.raises(UserError, match="runs with --backend onnxruntime"):
        open_runtime(fp32, "torch", device="cpu")


def test_ort_runtime_from_proto_bytes_and_path():
    import onnx

    model = fitted_model("net1")
    path = cached_artifact(model, "onnx")
    proto = onnx.load(str(path))
    x = sample_images()[:20]
    outs = [OrtRuntime(src).logits(x) for src in (path, str(path), proto, proto.SerializeToString())]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    rt = OrtRuntime(proto)
    assert rt.onnx_path() is None and rt.net == "net1" and rt.onnx_graph() is proto
    assert OrtRuntime(path).onnx_path() == path and rt.torch_module() is None
    assert set(rt.outputs(x)) == {"logits"}


def test_batches_above_max_batch_are_split():
    model = fitted_model("net1")
    rt = OrtRuntime(cached_artifact(model, "onnx"))
    x = sample_images()[:23]
    whole = rt.logits(x)
    calls = []
    run = rt._run
    rt._run = lambda b: calls.append(len(b)) or run(b)
    rt.max_batch = 7
    split = rt.logits(x)
    assert calls == [7, 7, 7, 2]
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (torch.rand(4, 3, 28, 28), "expected a \\[N, 3, 32, 32\\]"),
    (torch.rand(3, 32, 32), "expected a \\[N, 3, 32, 32\\]"),
    (torch.zeros(4, 3, 32, 32, dtype=torch.uint8), "expected float images"),
    (np.zeros((4, 3, 32, 32), np.float32), "torch.Tensor"),
])
def test_wrong_input_is_a_user_error(bad, match):
    for rt in (TorchRuntime(fitted_model("net1")), open_runtime(fitted_model("net1"), "onnxruntime", device="cpu")):
        with pytest.raises(UserError, match=match):
            rt.logits(bad)


def test_empty_batch_gives_empty_logits():
    rt = open_runtime(fitted_model("net1"), "onnxruntime", device="cpu")
    assert rt.logits(torch.rand(0, 3, 32, 32)).shape == (0, 10)


def test_half_precision_torch_needs_cuda():
    with pytest.raises(UserError, match="CUDA"):
        open_runtime(fitted_model("net1"), "torch", device="cpu", precision="fp16")
    with pytest.raises(UserError, match="fp32 or int8"):
        open_runtime(fitted_model("net1"), "onnxruntime", device="cpu", precision="fp16")


def test_ort_cuda_without_provider_is_a_user_error():
    from cifarbench.runtime.ort import available_providers, choose_providers

    assert choose_providers(CPU, available_providers()) == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="CUDA execution provider"):
        choose_providers(torch.device("cuda"), ["CPUExecutionProvider"])
    providers = choose_providers(torch.device("cuda:1"), ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                          "CPUExecutionProvider"], tensorrt_ep=True)
    assert [p if isinstance(p, str) else p[0] for p in providers] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers[1][1]["device_id"] == 1


def test_error_metrics_match_naive_numpy():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(50, 10, generator=g) * 3
    out = ref + torch.randn(50, 10, generator=g) * 0.01
    out[0] = out[0].flip(0)  # one row that surely disagrees on top-1
    m = error_metrics(ref, out)
    r, o = ref.double().numpy(), out.double().numpy()
    d = np.abs(r - o)
    softmax = lambda a: np.exp(a - a.max(1, keepdims=True)) / np.exp(a - a.max(1, keepdims=True)).sum(1, keepdims=True)
    dp = np.abs(softmax(r) - softmax(o))
    assert m["logits_max_abs"] == pytest.approx(d.max())
    assert m["logits_mean_abs"] == pytest.approx(d.mean())
    assert m["logits_max_rel"] == pytest.approx(d.max() / np.abs(r).max())
    assert m["probs_max_abs"] == pytest.approx(dp.max())
    assert m["probs_mean_rel"] == pytest.approx(dp.mean() / np.abs(softmax(r)).mean())
    assert m["top1_agreement"] == pytest.approx(np.mean(r.argmax(1) == o.argmax(1)))
    assert m["top1_agreement"] < 1


def test_judge_per_precision():
    ok = {"logits_max_abs_scaled": 5e-5, "top1_agreement": 0.995, "probs_max_abs": 0.01, "probs_mean_abs": 0.001}
    assert judge(ok, "fp32") == (True, [])
    assert judge({**ok, "logits_max_abs_scaled": 2e-4}, "fp32")[0] is False
    assert judge(ok, "int8")[0] and judge(ok, "fp16")[0]
    passed, failures = judge({**ok, "top1_agreement": 0.98}, "int8")
    assert not passed and "top1_agreement" in failures[0]


@pytest.mark.gpu
@pytest.mark.parametrize("backend, precision", [("torch", "fp32"), ("torch", "fp16"), ("torch-compile", "fp32"),
                                                ("aoti", "fp32")])
def test_cuda_backends(backend, precision):
    model = fitted_model("net1")
    rt = open_runtime(model, backend, device="cuda", precision=precision)
    assert rt.device.type == "cuda"
    x = sample_images().cuda()
    metrics = error_metrics(reference(model, x.cpu()), rt.logits(x))
    assert judge(metrics, precision)[0], metrics


@pytest.mark.gpu
def test_ort_cuda_iobinding():
    from cifarbench.runtime.ort import available_providers

    if "CUDAExecutionProvider" not in available_providers():
        pytest.skip("onnxruntime here has no CUDA execution provider (needs onnxruntime-gpu)")
    model = fitted_model("net1")
    rt = open_runtime(model, "onnxruntime", device="cuda")
    x = sample_images().cuda()
    out = rt.logits(x)
    assert out.device.type == "cuda"
    assert judge(error_metrics(reference(model, x.cpu()), out), "fp32")[0]


@pytest.mark.data
def test_int8_agreement_on_real_data(shared_data):
    """The issue's bar for onnx-int8 on net4: top-1 agreement >= 99 % with fp32 on real test images (trained
    weights; the first 1,000 test images, which cover every class: at most 10 may disagree), calibrated as a
    user's run is by default: on the bundled 250-image calibration set (the artifact the other int8 tests share
    from the cache)."""
    from cifarbench.data import load_split
    from cifarbench.zoo import bundled_weights, load_model

    if bundled_weights("net4") is None:
        pytest.skip("needs trained weights (models/weights/net4.safetensors)")
    model = load_model("net4")
    int8 = open_runtime(model, "onnx-int8", device="cpu")
    fp32 = open_runtime(model, "onnxruntime", device="cpu")
    test = load_split(str(shared_data), "test").subset(slice(0, 1000))
    x = test.float_images()
    agree = (int8.logits(x).argmax(1) == fp32.logits(x).argmax(1)).double().mean().item()
    assert agree >= 0.99
