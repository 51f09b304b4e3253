"""The performance-critical convolution path: every conv layer shape of net4, and its fused conv+BN+ReLU block,
across the backends that can run it here (torch eager NCHW, channels_last, torch.compile, ONNX Runtime).

Groups are per layer, so each backend is compared with the others on the same shape in the same run; GFLOP/s and
% of the matmul peak measured in the same run are in ``extra_info``.
"""
from __future__ import annotations

import io
import os

import pytest
import torch

from cifarbench import create_model
from conftest import DEVICE, sync

BATCH = 1024 if DEVICE.type == "cuda" else 32
ROUNDS = int(os.environ.get("CIFARBENCH_BENCH_ROUNDS", 20 if DEVICE.type == "cuda" else 3))


def _net4_layer_inputs() -> dict[str, tuple[torch.nn.Module, tuple[int, ...]]]:
    """conv block name -> (the block, with non-trivial BN statistics; its input shape)."""
    torch.manual_seed(0)
    model = create_model("net4").eval()
    shapes = {}
    hooks = [block.register_forward_pre_hook(lambda m, a, n=name: shapes.__setitem__(n, tuple(a[0].shape[1:])))
             for name, block in model.conv_blocks().items()]
    model(torch.rand(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    for block in model.conv_blocks().values():
        block.bn.running_mean.uniform_(-0.2, 0.2)
        block.bn.running_var.uniform_(0.5, 1.5)
    return {name: (block, shapes[name]) for name, block in model.conv_blocks().items()}


LAYERS = _net4_layer_inputs()
CASES = [(layer, part) for layer in LAYERS for part in ("conv", "block")]
BACKENDS = ["eager-nchw", "eager-channels-last", "torch-compile", "onnxruntime"]


def _runner(module: torch.nn.Module, x: torch.Tensor, backend: str):
    module = module.to(DEVICE).eval()
    if backend == "eager-nchw":
        return lambda: module(x)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    module = module.to(memory_format=torch.channels_last)
    if backend == "eager-channels-last":
        return lambda: module(x_cl)
    if backend == "torch-compile":
        compiled = torch.compile(module)
        return lambda: compiled(x_cl)
    if DEVICE.type != "cpu":
        pytest.skip("onnxruntime here is the CPU build")
    import onnxruntime as ort

    from cifarbench.runtime.ort import session_options

    buf = io.BytesIO()
    torch.onnx.export(module.to(memory_format=torch.contiguous_format).cpu(), (x.cpu(),), buf, dynamo=True,
                      input_names=["x"], external_data=False)
    session = ort.InferenceSession(buf.getvalue(), session_options(), providers=["CPUExecutionProvider"])
    feed = {"x": x.cpu().numpy()}
    return lambda: session.run(None, feed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer,part", CASES, ids=[f"{l}-{p}" for l, p in CASES])
def test_conv_path(benchmark, record, layer, part, backend):
    block, shape = LAYERS[layer]
    module = block.conv if part == "conv" else block
    benchmark.group = f"net4-{layer}-{part}"
    x = torch.rand(BATCH, *shape, device=DEVICE)
    run = _runner(module, x, backend)
    with torch.inference_mode():
        def timed():
            run()
            sync()

        benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=2)
    conv = block.conv
    out_hw = (shape[1] + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    flops = 2 * conv.in_channels * conv.out_channels * conv.kernel_size[0] ** 2 * out_hw ** 2 * BATCH
    record(images=BATCH, flops=flops, backend=backend, precision="fp32", batch=BATCH, layer=layer, part=part,
           shape=list(shape))
