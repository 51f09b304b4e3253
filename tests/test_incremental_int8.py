"""The int8 incremental engine against the int8 runtime whose graph it reads: ONNX Runtime running the whole
QDQ model on every occluded image, built one at a time."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import random_model
from test_incremental import naive_logits

from cifarbench.analysis.occlusion import load_image, make_engine, occlusion_maps
from cifarbench.export import cached_artifact
from cifarbench.kernels.incremental_int8 import (
    Int8Graph, Int8IncrementalOcclusion, OnednnQConv, OrtQLinearConv, int8_conv_class, onednn_available)
from cifarbench.runtime import open_runtime

CALIB = {"calib": 64, "calib_data": "synthetic"}


def int8_runtime(net, seed=21, **overrides):
    model = random_model(net, seed=seed, **overrides)
    return model, open_runtime(cached_artifact(model, "onnx-int8", **CALIB), device="cpu")


needs_onednn = pytest.mark.skipif(not onednn_available(), reason="no oneDNN int8 conv with ONNX Runtime's integers here (needs an AVX512-VNNI or AMX x86 CPU)")


@pytest.mark.parametrize("net,k,stride,overrides", [
    ("net1", 8, 3, {}), ("net2", 12, 5, {}), ("net3", 5, 4, {}), ("net4", 8, 2, {}), ("net4", 3, 7, {}),
    ("net1", 6, 5, {"stride": 2}),
])
def test_int8_incremental_equals_the_int8_runtime(net, k, stride, overrides):
    _, runtime = int8_runtime(net, **overrides)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(k * 31 + stride))
    baselines = torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.9, 0.3]])
    ref = naive_logits(runtime.logits, images, baselines, k, stride)
    results = {}
    for backend in ["onnxruntime"] + (["onednn"] if onednn_available() else []):
        got = Int8IncrementalOcclusion(runtime.proto, chunk=7, workers=2, conv_backend=backend).logits(
            images, baselines, k, stride)
        results[backend] = got
    one = Int8IncrementalOcclusion(runtime.proto, chunk=7, workers=1).logits(images, baselines, k, stride)
    assert (got - one).abs().max() <= 1e-5  # chunks side by side on worker threads = one after another
    # the two int8 conv backends compute the same integers, so the same logits bit for bit
    assert all(torch.equal(got, results["onnxruntime"]) for got in results.values())
    diff = (got - ref).abs()
    scale = ref.abs().max()
    # same integers, same scales: only the fp32 first conv (oneDNN here, MLAS there) can tip a value over a
    # rounding boundary of the next quantizer by one step. Such a step in the clean image's activations reaches
    # every position that reuses them, so it moves many logits a little (measured over 6 images x 3 nets: up to
    # 4.6e-4 of the logit scale, 6e-6 in probability), never one by much
    assert diff.max() <= 2e-3 * scale
    assert (got.softmax(-1) - ref.softmax(-1)).abs().max() <= 1e-4


def _qconv_args(rng, c_in, c_out, k, per_channel, y_scale=None):
    """Integers and scales of one int8 conv as an int8 graph holds them, with biases and sums large enough that
    requantization's float rounding matters (values land between quantization steps everywhere)."""
    weight = rng.integers(-127, 128, (c_out, c_in, k, k)).astype(np.int8)
    w_scale = rng.uniform(1e-3, 2e-2, c_out if per_channel else ()).astype(np.float32)
    bias = rng.integers(-40000, 40000, c_out).astype(np.int32)
    return (weight, w_scale, np.zeros(c_out if per_channel else (), np.int8), bias, np.float32(0.037),
            np.uint8(0), np.float32(y_scale or rng.uniform(0.05, 0.4)))


@needs_onednn
@pytest.mark.parametrize("c_in,c_out,k,stride,padding,per_channel,float_input,y_scale", [
    (64, 128, 3, 1, 0, True, False, None), (32, 48, 3, 2, 1, True, False, None),
    (16, 24, 5, 1, 2, False, False, None), (64, 64, 3, 1, 1, True, True, None), (3, 16, 1, 1, 0, False, True, 0.02),
])
def test_onednn_int8_conv_gives_onnxruntimes_integers(c_in, c_out, k, stride, padding, per_channel, float_input,
                                                       y_scale):
    """Bit for bit the same uint8 outputs as ONNX Runtime's QLinearConv (with its QuantizeLinear in front for a
    float input), windows and whole maps: the engine on either backend is one int8 model."""
    rng = np.random.default_rng(c_in + k)
    args = _qconv_args(rng, c_in, c_out, k, per_channel, y_scale) + (stride, padding)
    ort_conv = OrtQLinearConv(*args, float_input=float_input, threads=1)
    dnn_conv = OnednnQConv(*args, float_input=float_input, threads=1)
    if float_input:  # a fp32 layer's ReLU output, with values exactly on quantization ties too
        x = torch.from_numpy(rng.exponential(2.0, (6, 13, 11, c_in)).astype(np.float32))
        x[0, :3] = (torch.arange(3 * 11 * c_in).view(3, 11, c_in) % 9 + 0.5) * 0.037
    else:
        x = torch.from_numpy(rng.integers(0, 256, (6, 13, 11, c_in)).astype(np.uint8))
        x[rng.random(x.shape) < 0.5] = 0  # post-ReLU rows are half zeros
    oh, ow = (13 - k) // stride + 1, (11 - k) // stride + 1
    a, b = (torch.full((6, oh, ow, c_out), 7, dtype=torch.uint8) for _ in range(2))
    ort_conv.window(x.contiguous(), a)
    dnn_conv.window(x.contiguous(), b)
    assert 0.05 < (a > 0).float().mean() < 0.95 and (a == 255).any()  # the case is not trivial: both saturations
    assert torch.equal(a, b)
    nchw = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    assert torch.equal(ort_conv.full(nchw), dnn_conv.full(nchw))


def test_int8_conv_backends_are_chosen_and_named():
    assert int8_conv_class("onnxruntime") is OrtQLinearConv
    assert int8_conv_class("auto") is (OnednnQConv if onednn_available() else OrtQLinearConv)
    with pytest.raises(ValueError, match="choose from auto, onednn, onnxruntime"):
        int8_conv_class("tensorrt")
    with pytest.raises(ValueError, match="zero points of 0"):
        OnednnQConv(*_qconv_args(np.random.default_rng(0), 4, 4, 3, True)[:2], np.ones(4, np.int8),
                    *_qconv_args(np.random.default_rng(0), 4, 4, 3, True)[3:], 1, 0, float_input=False, threads=1)
    # int32 sums that can pass 2**24 (float32's exact integers) where the scale keeps them below saturation
    big = (np.full((4, 1024, 3, 3), 127, np.int8), np.float32(1e-3), np.int8(0), np.zeros(4, np.int32),
           np.float32(1e-3))
    with pytest.raises(ValueError, match="exact integers"):
        OnednnQConv(*big, np.uint8(0), np.float32(1.0), 1, 0, float_input=False, threads=1)
    OnednnQConv(*big, np.uint8(0), np.float32(1e-3), 1, 0, float_input=False, threads=1)  # there they saturate
    _, runtime = int8_runtime("net1")  # the agreement test's artifact, from the cache
    engine = Int8IncrementalOcclusion(runtime.proto, conv_backend="onnxruntime")
    assert engine.int8_convs == "onnxruntime"
    if onednn_available():
        assert Int8IncrementalOcclusion(runtime.proto).int8_convs == "onednn"


def test_net4_incremental_int8_map_equals_the_dense_int8_map():
    _, runtime = int8_runtime("net4", seed=22)
    image = load_image(np.random.default_rng(0).random((3, 32, 32), dtype=np.float32))[0][None]
    dense = occlusion_maps(make_engine(runtime, 8, 1, mode="dense"), image, 8)[0]
    incremental = occlusion_maps(make_engine(runtime, 8, 1, mode="incremental"), image, 8)[0]
    # the engine record also says which engine ran and why (what the occlusion JSON reports)
    assert {k: incremental.engine[k] for k in ("mode", "backend", "precision", "device", "engine")} == {
        "mode": "incremental", "backend": "onnx-int8", "precision": "int8", "device": "cpu",
        "engine": "incremental-int8"}
    assert incremental.engine["int8_convs"] in ("onednn", "onnxruntime")
    assert np.abs(incremental.map - dense.map).max() <= 1e-3


def test_auto_picks_incremental_int8_for_net4_and_explicit_modes_are_honoured():
    model, runtime = int8_runtime("net4", seed=23)
    assert make_engine(runtime, 8, 1).mode == "incremental"  # half the FLOPs of dense at K=8
    assert make_engine(runtime, 8, 1, mode="dense").mode == "dense"
    # an fp32 ONNX runtime runs the layer-graph engine on its graph translated to torch, not the int8 engine
    fp32 = open_runtime(cached_artifact(model, "onnx"), device="cpu")
    engine = make_engine(fp32, 8, 1, mode="incremental")
    assert engine.mode == "incremental" and engine.describe()["engine"] == "incremental-graph"


def test_graphs_it_cannot_read_are_refused():
    model, runtime = int8_runtime("net1", seed=24)
    with pytest.raises(ValueError, match="no int8 conv"):
        Int8Graph(open_runtime(cached_artifact(model, "onnx"), device="cpu").proto).layers()
    broken = type(runtime.proto)()
    broken.CopyFrom(runtime.proto)
    gemm = next(n for n in broken.graph.node if n.op_type == "Gemm")
    gemm.attribute.append(onnx.helper.make_attribute("alpha", 2.0))
    with pytest.raises(ValueError, match="plain Gemm"):
        Int8Graph(broken).layers()
