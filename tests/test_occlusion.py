"""Occlusion maps against a naive one-image-at-a-time reference and against Captum's ``Occlusion``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_model

from cifarbench import UserError, occlusion_map
from cifarbench.analysis.occlusion import DenseEngine, choose_mode, load_image, make_engine, occlusion_maps
from cifarbench.runtime import TorchRuntime

NETS = ("net1", "net2", "net3", "net4")


def naive_map(model, image, k, stride, target=None, fill=(0.5, 0.5, 0.5)):
    """The definition, literally: one occluded copy at a time through the unmodified model."""
    with torch.no_grad():
        clean = torch.softmax(model(image[None]), 1)[0]
        target = int(clean.argmax()) if target is None else target
        n = (32 - k) // stride + 1
        out = np.zeros((n, n), np.float32)
        for i in range(n):
            for j in range(n):
                x = image.clone()
                x[:, i * stride:i * stride + k, j * stride:j * stride + k] = torch.tensor(fill)[:, None, None]
                out[i, j] = torch.softmax(model(x[None]), 1)[0, target]
    return out, float(clean[target]), target


@pytest.fixture(scope="module")
def image():
    return load_image("examples/cat.png")[0]


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("mode", ["dense", "incremental"])
def test_engines_match_naive_reference(net, mode, image):
    model = random_model(net, seed=1)
    k, stride = (8, 1) if net == "net1" else (12, 5)
    ref, clean, target = naive_map(model, image, k, stride)
    r = occlusion_map(model, image, k, stride=stride, mode=mode, backend="torch", device="cpu")
    assert r.engine["mode"] == mode
    assert r.map.shape == ref.shape
    assert np.abs(r.map - ref).max() <= 1e-5
    assert abs(r.clean_prob - clean) <= 1e-5 and r.target == target
    assert r.map_sum == pytest.approx(float(ref.sum(dtype=np.float64)), abs=1e-4)
    worst = r.most_damaging
    assert r.map[worst["row"], worst["col"]] == r.map.min()
    assert worst["box"] == [worst["row"] * stride, worst["col"] * stride,
                            worst["row"] * stride + k, worst["col"] * stride + k]


def test_dense_through_onnxruntime_matches_naive(image):
    model = random_model("net1", seed=2)
    ref, _, _ = naive_map(model, image, 8, 2)
    r = occlusion_map(model, image, 8, stride=2, mode="dense", backend="onnxruntime", device="cpu")
    assert r.engine["backend"] == "onnxruntime"
    assert np.abs(r.map - ref).max() <= 1e-5


@pytest.mark.parametrize("baseline,fill", [("zero", (0.0,) * 3), ("0.25", (0.25,) * 3), ("mean", None)])
def test_baselines_and_label(baseline, fill, image):
    model = random_model("net1", seed=3)
    fill = tuple(image.mean((1, 2)).tolist()) if fill is None else fill
    ref, _, _ = naive_map(model, image, 6, 3, target=3, fill=fill)
    for mode in ("dense", "incremental"):
        r = occlusion_map(model, image, 6, stride=3, baseline=baseline, target="cat", mode=mode, backend="torch",
                          device="cpu")
        assert r.target == 3 and np.abs(r.map - ref).max() <= 1e-5


def test_batched_api_equals_single_images(synthetic_test):
    model = random_model("net4", seed=4)
    images = synthetic_test.float_images()[:3]
    for mode in ("dense", "incremental"):
        engine = make_engine(model, 12, 4, "torch", mode, "cpu")
        batched = occlusion_maps(engine, images, 12, stride=4, targets=[0, 5, 9])
        for b, r in enumerate(batched):
            single = occlusion_maps(engine, images[b:b + 1], 12, stride=4, targets=[r.target])[0]
            assert r.target == [0, 5, 9][b]
            assert np.abs(r.map - single.map).max() <= 1e-5


def test_auto_mode_follows_the_cost_model_and_explicit_backends(image):
    model = random_model("net1", seed=5)
    engine = make_engine(model, 8, 1, None, "auto", "cpu")
    assert engine.mode == choose_mode(model, "onnxruntime", torch.device("cpu"), 8, 1)
    # an explicit non-torch backend means dense through it; incremental with it is a user error
    assert make_engine(model, 8, 1, "onnxruntime", "auto", "cpu").mode == "dense"
    with pytest.raises(UserError, match="incremental"):
        make_engine(model, 8, 1, "onnxruntime", "incremental", "cpu")
    assert make_engine(model, 8, 1, "torch", "incremental", "cpu").mode == "incremental"


def _captum_attr(model, image, k, stride, target):
    from captum.attr import Occlusion

    wrapped = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    return Occlusion(wrapped).attribute(image[None], sliding_window_shapes=(3, k, k), strides=(3, stride, stride),
                                        baselines=0.5, target=target, perturbations_per_eval=64)[0]


@pytest.mark.parametrize("mode", ["dense", "incremental"])
def test_matches_captum_with_non_overlapping_windows(mode, image):
    """With stride == K and K dividing 32, each pixel lies in exactly one window, so Captum's attribution at a
    pixel is clean_prob - map[window] (Captum: clean minus occluded output, averaged over covering windows)."""
    model = random_model("net2", seed=6)
    r = occlusion_map(model, image, 8, stride=8, mode=mode, backend="torch", device="cpu")
    attr = _captum_attr(model, image, 8, 8, r.target)
    expected = np.kron(r.clean_prob - r.map, np.ones((8, 8), np.float32))
    assert np.abs(attr.numpy() - expected[None]).max() <= 1e-5


def test_matches_captum_with_overlapping_windows(image):
    """Overlapping windows (K=8, stride 4): Captum averages clean - occluded over the windows covering each pixel;
    rebuild that average from our map."""
    model = random_model("net4", seed=7)
    k, stride = 8, 4
    r = occlusion_map(model, image, k, stride=stride, mode="incremental", device="cpu")
    total, count = np.zeros((32, 32)), np.zeros((32, 32))
    for i in range(r.map.shape[0]):
        for j in range(r.map.shape[1]):
            total[i * stride:i * stride + k, j * stride:j * stride + k] += r.clean_prob - r.map[i, j]
            count[i * stride:i * stride + k, j * stride:j * stride + k] += 1
    attr = _captum_attr(model, image, k, stride, r.target)
    assert np.abs(attr.numpy() - (total / count)[None]).max() <= 1e-5


def test_to_dict_is_json_ready(image):
    import json

    r = occlusion_map(random_model("net1"), image, 16, stride=8, device="cpu")
    d = json.loads(json.dumps(r.to_dict()))
    assert set(d) >= {"image", "k", "stride", "target", "clean_prob", "map", "map_sum", "most_damaging"}
    assert np.allclose(d["map"], r.map) and r["map_sum"] == d["map_sum"]


@pytest.mark.parametrize("kwargs,message", [
    ({"k": 0}, "K must be"), ({"k": 33}, "K must be"), ({"k": 8, "stride": 0}, "stride"),
    ({"k": 8, "target": "unicorn"}, "unknown class"), ({"k": 8, "baseline": "blue"}, "baseline"),
    ({"k": 8, "baseline": "1.5"}, "baseline"), ({"k": 8, "mode": "fast"}, "mode"),
])
def test_bad_arguments_are_user_errors(kwargs, message, image):
    k = kwargs.pop("k")
    with pytest.raises(UserError, match=message):
        occlusion_map(random_model("net1"), image, k, device="cpu", **kwargs)


def test_bad_images_are_user_errors(tmp_path):
    from PIL import Image

    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match="not an image"):
        load_image(tmp_path / "notes.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    with pytest.raises(UserError, match="--resize"):
        load_image(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", resize=True)[0].shape == (3, 32, 32)
    with pytest.raises(UserError, match="no such"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(UserError):
        load_image(np.zeros((3, 16, 16), np.uint8))
    assert torch.equal(load_image(np.full((32, 32, 3), 255, np.uint8))[0], torch.ones(3, 32, 32))


def test_dense_engine_runs_any_runtime_in_chunks(image):
    """Chunks smaller than the position count give the same map."""
    model = random_model("net1", seed=8)
    rt = TorchRuntime(model, "cpu")
    full = occlusion_maps(DenseEngine(rt, chunk=10_000), image[None], 8)[0]
    chunked = occlusion_maps(DenseEngine(rt, chunk=37), image[None], 8)[0]
    assert np.abs(full.map - chunked.map).max() <= 1e-6
