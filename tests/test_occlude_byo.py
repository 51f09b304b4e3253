"""``occlude`` on models cifarbench did not make (issues 13/14): a CIFAR ResNet-20 and a MobileNetV2-style net as a
module, a state_dict with --arch, a fixed-batch ONNX file and TorchScript; a 64x64 model; an ImageNet-normalized
model with --mean/--std. Every map is checked against the naive loop of tests/occlusion_reference.py (the
definition: patch the image, run the unmodified model, softmax), never against cifarbench's own output. A stride
equal to K keeps the loop short.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from byo_models import IMAGENET_MEAN, IMAGENET_STD, build
from cli_helpers import assert_user_error, run_cli
from occlusion_reference import naive_map
from PIL import Image
from torch import nn

from cifarbench import UserError
from cifarbench.analysis.occlusion import occlusion_map

torch.set_num_threads(1)
RESNET = "tests.byo_models:resnet20"
CLASSES = ",".join(f"c{i}" for i in range(10))


def png(path, size=32, seed=0):
    """A random RGB PNG, and the [3, S, S] float tensor the toolkit reads from it."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def models():
    return {name: build(name) for name in ("resnet20", "mobilenetv2_tiny")}


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------------------ API
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_tiny"])
def test_modules_run_incremental_and_dense_equal_to_the_naive_loop(models, image, name):
    model = models[name]
    ref, target = naive_map(model, image, 8, 8)
    # auto times both exact engines where the FLOP rule is not clear-cut (ResNet-20 at stride 8: 16 positions, so
    # either may win here); whichever it picks, the map is the definition's
    auto = occlusion_map(model, image, 8, stride=8, backend="torch", device="cpu")
    assert auto.engine["engine"] in ("incremental-graph", "dense") and auto.engine["why"].startswith("auto:")
    incremental = occlusion_map(model, image, 8, stride=8, mode="incremental", backend="torch", device="cpu")
    assert incremental.engine["engine"] == "incremental-graph"
    dense = occlusion_map(model, image, 8, stride=8, mode="dense", backend="torch", device="cpu")
    assert dense.engine["engine"] == "dense"
    for r in (auto, incremental, dense):
        assert r.map.shape == (4, 4) and r.target == target
        assert np.abs(r.map - ref).max() <= 1e-5


def test_a_64x64_model_takes_64x64_images(tmp_path):
    torch.manual_seed(0)
    model = build("vgg_small", input_size=64)
    path, img = png(tmp_path / "big.png", 64)
    ref, _ = naive_map(model, img, 16, 16)
    for mode in ("incremental", "dense"):
        r = occlusion_map(model, path, 16, stride=16, mode=mode, backend="torch", device="cpu", input_size=64)
        assert r.map.shape == (4, 4)  # (64 - 16) // 16 + 1
        assert np.abs(r.map - ref).max() <= 1e-5
    with pytest.raises(UserError, match="between 1 and 64"):
        occlusion_map(model, path, 65, device="cpu", input_size=64)
    with pytest.raises(UserError, match="64x64"):  # a 32x32 image for a 64x64 model
        occlusion_map(model, torch.rand(3, 32, 32), 16, device="cpu", input_size=64)


def test_an_imagenet_normalized_model_with_mean_and_std(image):
    model = build("imagenet_cnn")
    ref, _ = naive_map(model, image, 8, 8, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    unnormalized, _ = naive_map(model, image, 8, 8)
    assert np.abs(ref - unnormalized).max() > 1e-3  # the contract matters for this model
    for mode in ("incremental", "dense"):
        r = occlusion_map(model, image, 8, stride=8, mode=mode, backend="torch", device="cpu",
                          mean=",".join(map(str, IMAGENET_MEAN)), std=",".join(map(str, IMAGENET_STD)))
        assert np.abs(r.map - ref).max() <= 1e-5


def test_api_device_names_are_checked(models, image):
    with pytest.raises(UserError, match="tpu"):
        occlusion_map(models["resnet20"], image, 8, stride=8, device="tpu")


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("byo_occlude")
    out = {}
    torch.save(models["resnet20"].state_dict(), root / "resnet20.pt")
    out["state_dict"] = root / "resnet20.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.trace(models["resnet20"], torch.zeros(1, 3, 32, 32))
        torch.jit.save(ts, str(root / "resnet20-ts.pt"))
        # the legacy exporter's file has a fixed batch of 1: the dense engine must feed it one image at a time
        torch.onnx.export(models["mobilenetv2_tiny"], (torch.zeros(1, 3, 32, 32),), str(root / "mobilenet.onnx"),
                          dynamo=False, input_names=["x"])
        program = torch.export.export(models["resnet20"], (torch.zeros(2, 3, 32, 32),),
                                      dynamic_shapes=({0: torch.export.Dim("n")},))
        torch.export.save(program, str(root / "resnet20.pt2"))
    out["torchscript"] = root / "resnet20-ts.pt"
    out["exported"] = root / "resnet20.pt2"
    out["onnx"] = root / "mobilenet.onnx"
    out["image"], out["pixels"] = png(root / "img.png", 32, seed=5)
    return out


def scripted(model: nn.Module, path):
    """``torch.jit.script`` of ``model`` saved at ``path`` (torch 2.14 calls scripting deprecated: not tested here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(path))
    return path


def dense_under_auto_and_one_line_under_incremental(capsys, tmp_path, files, path, match: str) -> str:
    """``auto`` runs ``path`` dense and says why (``match``); ``--mode incremental`` refuses in one line."""
    doc = occlude_json(capsys, tmp_path, files["image"], "--model", path)
    (r,) = doc["results"]
    assert r["engine"]["engine"] == "dense" and match in r["engine"]["why"]
    return assert_user_error(capsys, "occlude", files["image"], "--model", path, "--mode", "incremental", "--out",
                             tmp_path / "x", match=match)


def occlude_json(capsys, tmp_path, *args):
    code, out, err = run_cli(capsys, "occlude", "--k", "8", "--stride", "8", "--no-figures", "--json",
                             "--out", tmp_path / "o", *args)
    assert code == 0, err
    return json.loads(out)


def test_state_dict_with_arch_class_names_and_label(files, models, tmp_path, capsys):
    doc = occlude_json(capsys, tmp_path, files["image"], "--model", files["state_dict"], "--arch", RESNET,
                       "--classes", CLASSES, "--label", "c3")
    ref, _ = naive_map(models["resnet20"], files["pixels"], 8, 8, target=3)
    (r,) = doc["results"]
    assert r["target"] == 3 and r["target_class"] == "c3" and r["predicted_class"].startswith("c")
    assert np.abs(np.array(r["map"]) - ref).max() <= 1e-5
    assert r["engine"]["engine"] in ("incremental-graph", "dense") and "auto" in r["engine"]["why"]
    prov = doc["provenance"]
    assert prov["k"] == [8] and prov["stride"] == 8 and prov["engine"] == r["engine"]["engine"]
    assert prov["model"]["digest"] and (tmp_path / "o" / "index.html").is_file()


def test_numeric_class_names_label_by_name_on_the_cli_and_an_int_target_is_an_index(files, models, tmp_path,
                                                                                      capsys):
    """Classes named "1".."10": ``--label 3`` is class "3" (index 2), resolved once, never re-read as a name; the
    API's ``target=3`` (an int) is index 3 (class "4")."""
    numeric = ",".join(str(i) for i in range(1, 11))
    doc = occlude_json(capsys, tmp_path, files["image"], "--model", files["state_dict"], "--arch", RESNET,
                       "--classes", numeric, "--label", "3", "--mode", "dense", "--backend", "torch")
    (r,) = doc["results"]
    assert r["target"] == 2 and r["target_class"] == "3"
    ref, _ = naive_map(models["resnet20"], files["pixels"], 8, 8, target=2)
    assert np.abs(np.array(r["map"]) - ref).max() <= 1e-5
    api = occlusion_map(models["resnet20"], files["pixels"], 8, stride=8, target=3, mode="dense", backend="torch",
                        device="cpu", classes=numeric.split(","))
    assert api.target == 3
    ref, _ = naive_map(models["resnet20"], files["pixels"], 8, 8, target=3)
    assert np.abs(api.map - ref).max() <= 1e-5
    with pytest.raises(UserError, match="index 10"):
        occlusion_map(models["resnet20"], files["pixels"], 8, stride=8, target=10, classes=numeric.split(","),
                      mode="dense", backend="torch", device="cpu")


def test_fixed_batch_onnx_runs_incremental_on_its_graph_and_dense_when_asked(files, models, tmp_path, capsys):
    """A fixed-batch (1) ONNX MobileNetV2: auto runs the layer-graph engine on the graph translated to torch (any
    batch; its plan is a quarter of dense's FLOPs); --mode dense feeds onnxruntime exactly its batch. Both equal
    the naive loop."""
    ref, _ = naive_map(models["mobilenetv2_tiny"], files["pixels"], 8, 8)
    doc = occlude_json(capsys, tmp_path, files["image"], "--model", files["onnx"])
    (r,) = doc["results"]
    assert r["engine"]["engine"] == "incremental-graph" and "ONNX graph" in r["engine"]["why"]
    assert r["engine"]["why"].startswith("auto: incremental")
    assert np.abs(np.array(r["map"]) - ref).max() <= 1e-5
    doc = occlude_json(capsys, tmp_path / "dense", files["image"], "--model", files["onnx"], "--mode", "dense")
    (r,) = doc["results"]
    assert r["engine"]["engine"] == "dense" and r["engine"]["fixed_batch"] == 1
    assert r["engine"]["backend"] == "onnxruntime"
    assert np.abs(np.array(r["map"]) - ref).max() <= 1e-5


@pytest.mark.parametrize("fmt,graph", [("torchscript", "TorchScript graph"), ("exported", "torch.export graph")])
def test_torchscript_and_export_run_incremental_on_their_graph_exported_to_onnx(files, models, tmp_path, capsys,
                                                                               fmt, graph):
    """torch.fx cannot trace TorchScript, and a torch.export program is aten ops the IR does not map: their graphs
    go through ONNX to the layer-graph engine, exact."""
    ref, _ = naive_map(models["resnet20"], files["pixels"], 8, 8)
    for mode in ("incremental", "auto"):
        doc = occlude_json(capsys, tmp_path / mode, files["image"], "--model", files[fmt], "--mode", mode)
        (r,) = doc["results"]
        assert np.abs(np.array(r["map"]) - ref).max() <= 1e-5
        if r["engine"]["engine"] != "dense":  # auto may time dense faster on ResNet-20 at stride 8
            assert r["engine"]["engine"] == "incremental-graph"
            assert r["engine"]["graph"] == f"{graph} exported to ONNX, translated to torch"
            assert r["engine"]["graph"] in r["engine"]["why"]
        else:
            assert mode == "auto"
    assert doc["results"][0]["engine"]["why"].startswith("auto: ")


class Branchy(nn.Module):
    """Control flow on the data: TorchScript keeps it (an ONNX ``If`` on a mean over every axis), which the
    layer-graph IR cannot run."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if bool(y.mean() > 0.5):
            y = y * 2
        return self.fc(y.mean((2, 3)))


def test_torchscript_the_ir_cannot_run_goes_dense_under_auto_and_is_one_line_under_incremental(files, tmp_path,
                                                                                                capsys):
    torch.manual_seed(0)
    path = scripted(Branchy().eval(), tmp_path / "branchy.pt")
    line = dense_under_auto_and_one_line_under_incremental(capsys, tmp_path, files, path, "TorchScript graph")
    assert "--mode dense" in line and " op " in line  # it names the first op it cannot run


class SumPooled(nn.Module):
    """A sum pool (``divisor_override=1``): torch's TorchScript-based ONNX exporter drops the override without a
    word, so its ONNX graph is a different model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AvgPool2d(2, divisor_override=1)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


class Viewed(nn.Module):
    """``x.view(x.size(0), -1)`` after a conv: fails on channels-last maps, which the torch runtime prefers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(x.size(0), -1))


def test_a_torchscript_export_that_changes_the_model_is_never_run_as_exact(files, tmp_path, capsys):
    torch.manual_seed(0)
    path = scripted(SumPooled().eval(), tmp_path / "sum.pt")
    line = dense_under_auto_and_one_line_under_incremental(capsys, tmp_path, files, path, "does not reproduce")
    assert "TorchScript graph" in line


def test_a_model_that_views_its_maps_runs_dense_and_incremental(files, tmp_path, capsys):
    torch.manual_seed(0)
    model = Viewed().eval()
    scripted(model, tmp_path / "view.pt")
    ref, _ = naive_map(model, files["pixels"], 8, 8)
    for mode in ("dense", "incremental"):
        doc = occlude_json(capsys, tmp_path / mode, files["image"], "--model", tmp_path / "view.pt", "--mode", mode)
        assert np.abs(np.array(doc["results"][0]["map"]) - ref).max() <= 1e-5


class Picky(nn.Module):
    """Refuses inputs outside [0, 1] in its forward, as some users' models do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        if bool(x.min() < 0):
            raise ValueError("inputs must be in [0, 1]")
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["dense", "auto", "incremental"])
def test_a_model_that_raises_in_its_forward_is_one_line_naming_its_error(files, tmp_path, capsys, mode):
    """Its own error, in one line, whichever engine: never a traceback, never a map of input it refuses (the ONNX
    export drops the check, the probe of the export catches it)."""
    scripted(Picky().eval(), tmp_path / "picky.pt")
    line = assert_user_error(capsys, "occlude", files["image"], "--model", tmp_path / "picky.pt", "--mean",
                             "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--mode", mode, "--out", tmp_path / mode,
                             match="inputs must be in")
    assert "TorchScript interpreter" not in line
    assert not (tmp_path / mode / "img_k8.npy").exists()


class Rolled(nn.Module):
    """A spatial op the layer-graph IR cannot represent (a roll of the feature map)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.roll(torch.relu(self.conv(x)), 1, dims=2).mean((2, 3)))


def rolled(num_classes: int = 10) -> Rolled:
    return Rolled(num_classes)


def test_an_op_the_ir_refuses_goes_dense_under_auto_and_is_one_line_under_incremental(files, tmp_path, capsys):
    torch.manual_seed(0)
    model = rolled().eval()
    torch.save(model.state_dict(), tmp_path / "rolled.pt")
    arch = f"{__file__}:rolled"
    line = assert_user_error(capsys, "occlude", files["image"], "--model", tmp_path / "rolled.pt", "--arch", arch,
                             "--mode", "incremental", "--out", tmp_path / "x", match="--mode dense")
    assert "roll" in line
    doc = occlude_json(capsys, tmp_path, files["image"], "--model", tmp_path / "rolled.pt", "--arch", arch,
                       "--backend", "torch")
    (r,) = doc["results"]
    assert r["engine"]["engine"] == "dense" and "roll" in r["engine"]["why"]
    ref, _ = naive_map(model, files["pixels"], 8, 8)
    assert np.abs(np.array(r["map"]) - ref).max() <= 1e-5


def test_a_64x64_state_dict_on_the_cli(tmp_path, capsys):
    torch.manual_seed(0)
    model = build("vgg_small", input_size=64)
    torch.save(model.state_dict(), tmp_path / "vgg64.pt")
    path, img = png(tmp_path / "big.png", 64, seed=2)
    doc = occlude_json(capsys, tmp_path, path, "--model", tmp_path / "vgg64.pt", "--arch",
                       "tests.byo_models:vgg_small", "--arch-kw", "input_size=64", "--input-size", "64")
    ref, _ = naive_map(model, img, 8, 8)
    (r,) = doc["results"]
    assert np.array(r["map"]).shape == (8, 8)
    assert np.abs(np.array(r["map"]) - ref).max() <= 1e-5


# ------------------------------------------------------------------------------------------------ Ray
def test_ray_executor_equals_local(ray_cluster, tmp_path, capsys):
    args = ("--data", "synthetic:60", "--indices", "0:6", "--k", "16", "--stride", "16", "--model", "net1")
    local = occlude_json(capsys, tmp_path / "local", *args)
    ray = occlude_json(capsys, tmp_path / "ray", *args, "--executor", "ray")
    assert ray["engine"]["executor"] == "ray" and local["engine"]["executor"] == "local"
    assert [r["image"] for r in ray["results"]] == [r["image"] for r in local["results"]]
    for a, b in zip(local["results"], ray["results"]):
        assert np.abs(np.array(a["map"]) - np.array(b["map"])).max() <= 1e-6
        assert a["target"] == b["target"] and a["true"] == b["true"]
    assert_user_error(capsys, "occlude", "examples/cat.png", "--executor", "ray", "--out", tmp_path / "x",
                      match="--data")


def test_imagenet_normalized_state_dict_with_mean_and_std_on_the_cli(files, tmp_path, capsys):
    model = build("imagenet_cnn")
    torch.save(model.state_dict(), tmp_path / "inet.pt")
    norm = ("--mean", ",".join(map(str, IMAGENET_MEAN)), "--std", ",".join(map(str, IMAGENET_STD)))
    doc = occlude_json(capsys, tmp_path, files["image"], "--model", tmp_path / "inet.pt", "--arch",
                       "tests.byo_models:imagenet_cnn", *norm)
    ref, _ = naive_map(model, files["pixels"], 8, 8, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    (r,) = doc["results"]
    assert r["engine"]["engine"] == "incremental-graph"
    assert np.abs(np.array(r["map"]) - ref).max() <= 1e-5
    assert doc["provenance"]["model"]["digest"]
