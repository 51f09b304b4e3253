"""Bring your own model through the CLI: eval, ablate, mine and layers on third-party-style nets (tests.byo_models,
random weights, fixed seed) given as an ONNX file (external data, fixed batch 1), a state_dict with --arch and a
TorchScript file; every number is checked against plain torch written here, never against cifarbench's output."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import assert_user_error, run_cli
from tests import byo_models
from cifarbench.data import load_split

DATA = "synthetic:250"   # 50 test images
ARCH = {"resnet20": "tests.byo_models:resnet20", "mobilenetv2_tiny": "tests.byo_models:mobilenetv2_tiny"}
LAYER = {"resnet20": ("layer1.0.conv1", "layer1.0.bn1", "/layer1/layer1.0/conv1/Conv"),
         "mobilenetv2_tiny": ("features.1.conv.0", "features.1.conv.1", "/features/features.1/conv/conv.0/Conv")}


def _model(name: str):
    torch.manual_seed(0)
    model = byo_models.FACTORIES[name]().eval()
    with torch.no_grad():  # non-trivial BN statistics, so BN placement matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{(net, form): [MODEL, extra args]} for every net and form."""
    import onnx

    root = tmp_path_factory.mktemp("byo")
    out = {}
    for name in ARCH:
        model = _model(name)
        sd = root / f"{name}.pt"
        torch.save(model.state_dict(), sd)
        out[name, "state_dict"] = [str(sd), "--arch", ARCH[name]]
        ts = root / f"{name}-ts.pt"
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 32, 32)), str(ts))
        out[name, "torchscript"] = [str(ts)]
        plain = root / f"{name}-plain.onnx"
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(plain), dynamo=False, input_names=["x"])
        proto = onnx.load(str(plain))
        path = root / f"{name}.onnx"   # fixed batch 1, weights in name.onnx.data beside it
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{name}.onnx.data", size_threshold=0)
        out[name, "onnx"] = [str(path)]
    return out


@pytest.fixture(scope="module")
def data():
    return load_split(DATA, "test")


def _logits(model, x, mean=None, std=None):
    if mean is not None:
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x)


FORMS = [(n, f) for n in ARCH for f in ("onnx", "state_dict", "torchscript")]


@pytest.mark.parametrize("name, form", FORMS)
def test_eval_accuracy_equals_a_plain_loop(capsys, files, data, name, form):
    code, out, err = run_cli(capsys, "eval", *files[name, form], "--data", DATA, "--json")
    assert code in (0, None), err
    got = json.loads(out)
    preds = _logits(_model(name), data.float_images()).argmax(1)
    assert got["images"] == len(data) == 50
    assert got["accuracy"] == pytest.approx((preds == data.labels).double().mean().item(), abs=0)


@pytest.mark.parametrize("name, form", FORMS)
def test_ablate_equals_a_fresh_zeroed_model(capsys, files, data, name, form):
    conv, _, onnx_name = LAYER[name]
    layer = onnx_name if form == "onnx" else conv
    code, out, err = run_cli(capsys, "ablate", *files[name, form], "--filters", f"{layer}:3", "--data", DATA,
                             "--backend", "onnxruntime" if form == "onnx" else "torch", "--json")
    assert code in (0, None), err
    got = json.loads(out)
    fresh = _model(name)
    with torch.no_grad():
        dict(fresh.named_modules())[conv].weight[3] = 0
    preds = _logits(fresh, data.float_images()).argmax(1).numpy()
    conf = np.zeros((10, 10), np.int64)
    np.add.at(conf, (data.labels.numpy(), preds), 1)
    assert got["confusion"]["after"] == conf.tolist()
    assert got["filters"] == [{"layer": layer, "filter": 3}]


@pytest.mark.parametrize("name, form", [(n, f) for n in ARCH for f in ("onnx", "state_dict")])
def test_mine_top_k_equals_hooks(capsys, files, data, name, form):
    conv, bn, onnx_name = LAYER[name]
    layer = onnx_name if form == "onnx" else conv
    code, out, err = run_cli(capsys, "mine", *files[name, form], "--filters", f"{layer}:0-3", "--top", "5",
                             "--data", DATA, "--backend", "onnxruntime" if form == "onnx" else "torch", "--json")
    assert code in (0, None), err
    got = json.loads(out)
    model, maps = _model(name), []
    # the pre-ReLU map: the output of the BatchNorm right after the conv
    dict(model.named_modules())[bn].register_forward_hook(lambda m, i, o: maps.append(o.clone()))  # before an in-place ReLU6
    _logits(model, data.float_images())
    resp = maps[0].sum((2, 3)).double()                       # [N, C]
    for f in got["filters"]:
        j = f["filter"]
        order = sorted(range(len(data)), key=lambda i: (-resp[i, j].item(), i))[:5]
        got_idx = [t["index"] for t in f["top"]]
        assert got_idx == order, (f, got_idx, order)
        assert np.allclose([t["response"] for t in f["top"]], resp[order, j].tolist(), rtol=1e-4, atol=1e-4)


def test_layers_json_names_filters_and_receptive_fields(capsys, files):
    code, out, err = run_cli(capsys, "layers", *files["resnet20", "state_dict"], "--json")
    assert code in (0, None), err
    layers = {d["name"]: d for d in json.loads(out)["layers"]}
    assert len(layers) == 1 + 18 + 2    # stem, 9 blocks x 2 convs, 2 projection shortcuts
    # by hand: 3x3 stride 1 convs add 2 each; stride-2 conv at layer2.0 doubles the jump
    assert (layers["conv1"]["filters"], layers["conv1"]["receptive_field"]) == (16, 3)
    assert layers["layer1.0.conv1"]["receptive_field"] == 5
    assert layers["layer1.2.conv2"]["receptive_field"] == 15
    l2 = layers["layer2.0.conv1"]
    assert (l2["filters"], l2["stride"], l2["receptive_field"], l2["jump"], l2["out_size"]) == (32, [2, 2], 17, 2, 16)
    assert layers["layer2.0.conv2"]["receptive_field"] == 17 + 2 * 2
    assert layers["layer2.0.shortcut.0"]["receptive_field"] == 15        # 1x1: the block input's field
    assert layers["layer2.1.conv1"]["receptive_field"] == 21 + 2 * 2     # max over the add's two paths
    code, out, err = run_cli(capsys, "layers", *files["resnet20", "onnx"], "--json")
    onnx_layers = json.loads(out)["layers"]
    assert [d["receptive_field"] for d in onnx_layers] == [d["receptive_field"] for d in layers.values()]
    assert onnx_layers[1]["name"] == "/layer1/layer1.0/conv1/Conv"
    code, out, err = run_cli(capsys, "layers", *files["mobilenetv2_tiny", "onnx"], "--json")
    dw = [d for d in json.loads(out)["layers"] if d["groups"] > 1]
    assert dw and all(d["groups"] == d["filters"] == d["in_channels"] for d in dw)   # depthwise


def test_imagenet_normalized_model_with_mean_std(capsys, tmp_path, data):
    torch.manual_seed(0)
    model = byo_models.imagenet_cnn().eval()
    torch.save(model.state_dict(), tmp_path / "inet.pt")
    norm = ["--mean", ",".join(map(str, byo_models.IMAGENET_MEAN)), "--std", ",".join(map(str, byo_models.IMAGENET_STD))]
    code, out, err = run_cli(capsys, "eval", tmp_path / "inet.pt", "--arch", "tests.byo_models:imagenet_cnn", *norm,
                             "--data", DATA, "--backend", "torch", "--json")
    assert code in (0, None), err
    preds = _logits(model, data.float_images(), byo_models.IMAGENET_MEAN, byo_models.IMAGENET_STD).argmax(1)
    assert json.loads(out)["accuracy"] == (preds == data.labels).double().mean().item()


def test_mismatches_are_one_error_line(capsys, files, tmp_path):
    sd = files["resnet20", "state_dict"]
    assert_user_error(capsys, "eval", *sd, "--classes", "a,b,c", "--data", DATA, match="classes")
    assert_user_error(capsys, "eval", *files["resnet20", "onnx"], "--input-size", "64", "--data", DATA,
                      match="32x32")
    torch.manual_seed(0)
    torch.save(byo_models.resnet20(num_classes=5).state_dict(), tmp_path / "five.pt")
    assert_user_error(capsys, "ablate", tmp_path / "five.pt", "--arch", ARCH["resnet20"], "--arch-kw",
                      "num_classes=5", "--filters", "conv1:0", "--data", DATA, match="class")
    assert_user_error(capsys, "ablate", *sd, "--filters", "layer9.conv1:0", "--data", DATA, match="unknown layer")
    assert_user_error(capsys, "ablate", *sd, "--filters", "layer1.0.conv1:16", "--data", DATA, match="out of range")
