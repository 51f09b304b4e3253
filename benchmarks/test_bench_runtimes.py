"""End-to-end net4 inference per backend at one batch size, in one group so the ratios come from one run.

Targets (issue 3, this CPU, batch 625): ONNX Runtime fp32 >= 2x torch eager (contiguous); onnx-int8 >= 3x ONNX
Runtime fp32 (its top-1 agreement is checked on real data in tests/test_runtimes.py and by ``cifarbench
verify``); AOTInductor within 1.2x of the best fp32 backend. Each benchmark records its images/s, GFLOP/s and
its speed relative to torch eager and to ONNX Runtime fp32 in ``extra_info``. On a GPU the group adds fp16,
torch.compile with CUDA graphs (``reduce-overhead``), AOTInductor on CUDA, and ``max-autotune`` when
``CIFARBENCH_BENCH_AUTOTUNE=1`` (its compile takes minutes).

The weights are the bundled net4 weights when present, else random (throughput does not depend on them).
"""
from __future__ import annotations

import os

import pytest
import torch

from cifarbench.nets import count_flops

BATCH = int(os.environ.get("CIFARBENCH_BENCH_BATCH", 625))
ROUNDS = int(os.environ.get("CIFARBENCH_BENCH_ROUNDS", 3))
_means: dict[str, float] = {}


@pytest.fixture(scope="module")
def net4():
    from cifarbench.zoo import bundled_weights, create_model, load_model

    if bundled_weights("net4"):
        return load_model("net4")
    torch.manual_seed(0)
    return create_model("net4").eval()


@pytest.fixture(scope="module")
def images(device):
    return torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)


def _run(benchmark, record, name, rt, net, images):
    rt.logits(images)  # compile, capture, allocate outside the timing
    benchmark.pedantic(lambda: _call(rt, images), rounds=ROUNDS, warmup_rounds=1)
    _means[name] = benchmark.stats.stats.mean
    ratios = {f"x_{base}": round(_means[base] / _means[name], 2) for base in ("torch_eager", "onnxruntime")
              if base in _means}
    record(images=BATCH, flops=count_flops(net) * BATCH, backend=rt.name, precision=rt.precision, batch=BATCH,
           **ratios)


def _call(rt, images):
    out = rt.logits(images)
    if out.device.type == "cuda":
        torch.cuda.synchronize()
    return out


GROUP = pytest.mark.benchmark(group=f"net4-inference-b{BATCH}")


@GROUP
def test_torch_eager(benchmark, record, net4, images, device):
    from cifarbench.runtime import TorchRuntime

    _run(benchmark, record, "torch_eager", TorchRuntime(net4, device, channels_last=False), net4, images)


@GROUP
def test_torch_channels_last(benchmark, record, net4, images, device):
    from cifarbench.runtime import TorchRuntime

    _run(benchmark, record, "torch_channels_last", TorchRuntime(net4, device), net4, images)


@GROUP
def test_onnxruntime_fp32(benchmark, record, net4, images, device):
    from cifarbench.runtime import open_runtime
    from cifarbench.runtime.ort import available_providers

    if device.type == "cuda" and "CUDAExecutionProvider" not in available_providers():
        pytest.skip("onnxruntime here is the CPU build")
    _run(benchmark, record, "onnxruntime", open_runtime(net4, "onnxruntime", device), net4, images)


@GROUP
def test_onnx_int8(benchmark, record, net4, images, device):
    from cifarbench.runtime import open_runtime

    if device.type == "cuda":
        pytest.skip("onnx-int8 is the CPU int8 path (TensorRT int8 covers the GPU)")
    rt = open_runtime(net4, "onnx-int8", device, calib=128, calib_data=os.environ.get("CIFARBENCH_CALIB_DATA",
                                                                                       "synthetic"))
    _run(benchmark, record, "onnx_int8", rt, net4, images)


@GROUP
def test_aoti(benchmark, record, net4, images, device):
    from cifarbench.runtime import open_runtime

    _run(benchmark, record, "aoti", open_runtime(net4, "aoti", device), net4, images)


@GROUP
def test_torch_compile(benchmark, record, net4, images, device):
    from cifarbench.runtime import open_runtime

    _run(benchmark, record, "torch_compile", open_runtime(net4, "torch-compile", device), net4, images)


@GROUP
@pytest.mark.parametrize("backend, mode", [("torch", None), ("torch-compile", "reduce-overhead"),
                                           ("torch-compile", "max-autotune"), ("aoti", None)])
def test_cuda_fp16(benchmark, record, net4, images, device, backend, mode):
    from cifarbench.runtime import open_runtime

    if device.type != "cuda":
        pytest.skip("fp16 inference is measured on CUDA only")
    if mode == "max-autotune" and os.environ.get("CIFARBENCH_BENCH_AUTOTUNE") != "1":
        pytest.skip("max-autotune compiles for minutes; set CIFARBENCH_BENCH_AUTOTUNE=1")
    rt = open_runtime(net4, backend, device, precision="fp16", **({"mode": mode} if mode else {}))
    _run(benchmark, record, f"{backend}_{mode}_fp16", rt, net4, images)


@GROUP
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt(benchmark, record, net4, images, device, precision):
    import importlib.util

    from cifarbench.runtime import open_runtime

    if device.type != "cuda" or importlib.util.find_spec("tensorrt") is None:
        pytest.skip("TensorRT needs a GPU and the tensorrt package")
    rt = open_runtime(net4, "tensorrt", device, precision=precision,
                      calib_data=os.environ.get("CIFARBENCH_CALIB_DATA", "synthetic"))
    _run(benchmark, record, f"tensorrt_{precision}", rt, net4, images)
