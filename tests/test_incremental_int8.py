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
from cifarbench.kernels.incremental_int8 import Int8Graph, Int8IncrementalOcclusion
from cifarbench.runtime import open_runtime

CALIB = {"calib": 64, "calib_data": "synthetic"}


def int8_runtime(net, seed=21, **overrides):
    model = random_model(net, seed=seed, **overrides)
    return model, open_runtime(cached_artifact(model, "onnx-int8", **CALIB), device="cpu")


@pytest.mark.parametrize("net,k,stride,overrides", [
    ("net1", 8, 3, {}), ("net2", 12, 5, {}), ("net3", 5, 4, {}), ("net4", 8, 2, {}), ("net4", 3, 7, {}),
    ("net1", 6, 5, {"stride": 2}),
])
def test_int8_incremental_equals_the_int8_runtime(net, k, stride, overrides):
    _, runtime = int8_runtime(net, **overrides)
    images = torch.rand(2, 3, 32, 32)
    baselines = torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.9, 0.3]])
    ref = naive_logits(runtime.logits, images, baselines, k, stride)
    got = Int8IncrementalOcclusion(runtime.proto, chunk=7, workers=2).logits(images, baselines, k, stride)
    one = Int8IncrementalOcclusion(runtime.proto, chunk=7, workers=1).logits(images, baselines, k, stride)
    assert (got - one).abs().max() <= 1e-5  # chunks side by side on worker threads = one after another
    diff = (got - ref).abs()
    scale = ref.abs().max()
    # same integers, same scales: only the fp32 first conv (oneDNN here, MLAS there) can tip a value over a
    # rounding boundary of the next quantizer, by one step, in a rare position
    assert (diff <= 1e-5 * scale).float().mean() >= 0.99
    assert diff.max() <= 0.05 * scale


def test_net4_incremental_int8_map_equals_the_dense_int8_map():
    _, runtime = int8_runtime("net4", seed=22)
    image = load_image(np.random.default_rng(0).random((3, 32, 32), dtype=np.float32))[0][None]
    dense = occlusion_maps(make_engine(runtime, 8, 1, mode="dense"), image, 8)[0]
    incremental = occlusion_maps(make_engine(runtime, 8, 1, mode="incremental"), image, 8)[0]
    # the engine record also says which engine ran and why (what the occlusion JSON reports)
    assert {k: incremental.engine[k] for k in ("mode", "backend", "precision", "device", "engine")} == {
        "mode": "incremental", "backend": "onnx-int8", "precision": "int8", "device": "cpu",
        "engine": "incremental-int8"}
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
