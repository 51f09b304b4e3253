"""Filter mining checked against an independent computation on full feature maps."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cifarbench.analysis.mining import StreamingTopK, mine, torch_probe
from cifarbench.data import load_split
from cifarbench.filters import all_filters, resolve_selection
from cifarbench.nets import MEAN, STD, ConvBlock, receptive_patch
from cifarbench.runtime import TorchRuntime
from cifarbench.zoo import create_model
from conftest import random_model

K = 6


@pytest.fixture(scope="module")
def data():
    return load_split("synthetic:300", "test")  # 60 images


@pytest.fixture(scope="module")
def net4():
    """A small net4 with conv2 filter 1 made dead (zero weights, negative BN shift) and conv3 filter 2 made
    constant (zero weights, positive shift: every image and position ties)."""
    model = random_model("net4", l1_oc=4)
    with torch.no_grad():
        for layer, j, beta in (("conv2", 1, -1.0), ("conv3", 2, 0.5)):
            block = model.conv_blocks()[layer]
            block.conv.weight[j] = 0
            block.conv.bias[j] = 0
            block.bn.running_mean[j] = 0
            block.bn.bias[j] = beta
    return model




def full_maps(model, data):
    """Independent: pre-ReLU maps of every conv layer via ``pre_relu`` while walking the layers, in float64."""
    net = create_model(model.name, **model.hparams)
    net.load_state_dict(model.state_dict())
    net = net.double().eval()
    maps, h = {}, (data.images.double() / 255 - MEAN[0]) / STD[0]
    with torch.no_grad():
        for name, layer in net.layers.named_children():
            if isinstance(layer, ConvBlock):
                maps[name] = layer.pre_relu(h)
                h = torch.relu(maps[name])
            else:
                h = layer(h)
    return maps


def test_top_k_responses_and_argmax_match_reference(net4, data):
    sel = resolve_selection(net4, ["conv1:0,3", "conv2:0,1", "conv3:1,2", "conv5:7", "conv6:0-3"])
    result = mine(TorchRuntime(net4), net4, data, sel, k=K, batch_size=16)
    maps = full_maps(net4, data)
    geometry = net4.geometry()
    labels = data.labels.numpy()
    for f, (layer, j) in enumerate(result.selection):
        fmap = maps[layer][:, j].numpy()                        # [N, H, W]
        resp = fmap.reshape(len(fmap), -1).sum(1)
        order = np.lexsort((np.arange(len(resp)), -resp))[:K]   # by response, ties to the lower index
        if layer == "conv3" and j == 2:
            assert np.all(resp == resp[0]) and list(order) == list(range(K))
        assert list(result.top_index[f]) == list(order), (layer, j)
        np.testing.assert_allclose(result.top_response[f], resp[order], rtol=1e-4, atol=1e-3)
        width = fmap.shape[2]
        for k, i in enumerate(order):
            pos = int(np.argmax(fmap[i].ravel()))               # first maximum
            assert tuple(result.top_position[f, k]) == (pos // width, pos % width)
            assert tuple(result.top_patch[f, k]) == receptive_patch(geometry[layer], pos // width, pos % width)
        assert list(result.labels[f]) == list(labels[order])
    dead = {f for f in all_filters(net4) if maps[f[0]][:, f[1]].max() <= 0}
    assert set(result.dead) == dead and ("conv2", 1) in dead and ("conv3", 2) not in dead


def test_onnx_probe_equals_torch_hooks(net4, data):
    from cifarbench.export.onnx import to_onnx_proto
    from cifarbench.export.probe import probe_graph
    from cifarbench.runtime.ort import OrtRuntime

    proto = to_onnx_proto(net4)
    runtime = OrtRuntime(proto)
    runtime.proto = proto
    sel = all_filters(net4)
    a = mine(TorchRuntime(net4), net4, data, sel, k=K)
    b = mine(runtime, net4, data, sel, k=K)
    assert np.array_equal(a.top_index, b.top_index)
    assert np.array_equal(a.top_position, b.top_position)
    np.testing.assert_allclose(a.top_response, b.top_response, rtol=1e-4, atol=1e-3)
    assert a.dead == b.dead
    # the probe adds only [N, C] outputs: no feature map leaves the runtime
    outs = probe_graph(proto, net4).graph.output
    assert all(len(o.type.tensor_type.shape.dim) == 2 for o in outs)
    assert len(outs) == 1 + 3 * len(net4.conv_blocks())


def test_probe_graph_pools_before_relu_and_keeps_the_logits(net4, data):
    """The probe moves each 2x2 MaxPool ahead of its ReLU (so the unfused ReLU runs on the pooled map): the graph
    must still compute the net's logits, and the pools must now read the pre-ReLU maps the probe reduces."""
    from cifarbench.export.onnx import to_onnx_proto
    from cifarbench.export.probe import pre_relu_tensors, probe_graph
    from cifarbench.runtime.ort import OrtRuntime

    proto = to_onnx_proto(net4)
    probed = probe_graph(proto, net4)
    pre = set(pre_relu_tensors(proto, net4).values())
    pools = [n for n in probed.graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 2 and all(n.input[0] in pre for n in pools)
    batch = data.float_images()[:16]
    plain = OrtRuntime(proto).logits(batch)
    outs = OrtRuntime(probed).outputs(batch)
    np.testing.assert_allclose(outs[proto.graph.output[0].name].numpy(), plain.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain.numpy(), net4(batch).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_streaming_selection_does_not_depend_on_batching(net4, data):
    sel = resolve_selection(net4, None)
    small = mine(TorchRuntime(net4), net4, data, sel, k=K, batch_size=7)
    large = mine(TorchRuntime(net4), net4, data, sel, k=K, batch_size=1000)
    assert np.array_equal(small.top_index, large.top_index)
    assert np.array_equal(small.top_position, large.top_position)


def test_streaming_top_k_memory_and_ties():
    top = StreamingTopK(rows=2, k=3)
    top.update(torch.tensor([[1.0, 5.0], [2.0, 2.0]]), 0, torch.tensor([[0, 1], [2, 3]]))
    top.update(torch.tensor([[5.0, 0.0, 9.0], [2.0, 2.0, 3.0]]), 2, torch.tensor([[4, 5, 6], [7, 8, 9]]))
    assert top.values.shape == (2, 3) and top.index.shape == (2, 3)
    assert top.index.tolist() == [[4, 1, 2], [4, 0, 1]]
    assert top.payload.tolist() == [[6, 1, 4], [9, 2, 3]]


def test_receptive_fields_and_clipped_patches():
    net4 = create_model("net4")
    assert list(net4.receptive_fields().values()) == [3, 5, 7, 12, 16, 20]
    geom = net4.geometry()
    for layer in ("conv1", "conv4", "conv6"):
        g = geom[layer]
        last = g.out_size - 1
        for y, x in ((0, 0), (last, last), (0, last)):
            y0, x0, y1, x1 = receptive_patch(g, y, x)
            assert 0 <= y0 < y1 <= 32 and 0 <= x0 < x1 <= 32
            assert y1 - y0 <= g.rf and x1 - x0 <= g.rf
    assert receptive_patch(geom["conv6"], 0, 0)[:2] == (0, 0)              # clipped at the top-left border
    assert receptive_patch(geom["conv6"], 11, 11)[2:] == (32, 32)          # and at the bottom-right one
    assert receptive_patch(geom["conv1"], 5, 7) == (5, 7, 8, 10)           # unpadded conv1: a full 3x3


def test_json_schema(net4, data):
    result = mine(TorchRuntime(net4), net4, data, resolve_selection(net4, ["conv2:0,1"]), k=4).to_json()
    assert set(result) == {"filters", "receptive_fields", "dead_filters", "negative_filters"}
    f = result["filters"][0]
    assert set(f) == {"layer", "filter", "top", "class_histogram", "max_class", "mean_top_response",
                      "max_response", "all_top_negative"}
    assert set(f["top"][0]) == {"index", "label", "response", "patch"}
    assert sum(f["class_histogram"].values()) == 4
    assert f["max_response"] == f["top"][0]["response"]
    assert f["mean_top_response"] == pytest.approx(np.mean([t["response"] for t in f["top"]]))
    assert {"layer": "conv2", "filter": 1} in result["dead_filters"]


def test_torch_probe_leaves_the_users_net_alone(net4, data):
    stats = torch_probe(copy.deepcopy(net4))(data.float_images()[:4])
    assert set(stats) == set(net4.conv_blocks()) and stats["conv6"][0].shape == (4, 32)
    runtime = TorchRuntime(net4)
    mine(runtime, net4, data, (("conv1", 0),), k=2)
    assert not any(m._forward_hooks for m in runtime.model.modules())  # mine() hooked a copy
