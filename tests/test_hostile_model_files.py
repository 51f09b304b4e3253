"""Model files that try to run code, and model shapes a first version got wrong: a torch.export archive with a
pickled constant, an AOTInductor package named like weights, a model without convolutions, an ONNX graph with
several outputs, an ONNX graph of any spatial size. Numbers against plain loops and the naive occlusion loop."""
from __future__ import annotations

import json
import shutil
import subprocess
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from cli_helpers import assert_user_error, run_cli
from occlusion_reference import naive_map


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _small():
    torch.manual_seed(0)
    return Small().eval()


def _image(tmp_path, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    return tmp_path / "img.png", torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255


def _onnx(module, path, args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=["input"], **kw)
    return path


@pytest.fixture(scope="module")
def program_archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "small.pt2"
    torch.export.save(torch.export.export(_small(), (torch.rand(1, 3, 32, 32),)), str(path))
    return path


class _Touch:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_a_program_archive_with_a_pickled_constant_is_refused_before_anything_runs(tmp_path, capsys,
                                                                                    program_archive):
    """torch.export.load reads an ``opaque_obj_*`` constant with plain pickle.loads, flagged or not; a file of
    this format is not opened unless every payload is a raw tensor."""
    marker = tmp_path / "pwned"
    payload = __import__("pickle").dumps(_Touch(marker))
    payload += b"\0" * (-len(payload) % 4 + 32)
    with zipfile.ZipFile(program_archive) as src:
        prefix = src.namelist()[0].split("/", 1)[0]
        weights = json.loads(src.read(f"{prefix}/data/weights/model_weights_config.json"))
        meta = next(iter(weights["config"].values()))["tensor_meta"]
        for name, suffix in (("evil.pt2", ".pt2"), ("evil_weights.pt", ".pt")):
            with zipfile.ZipFile(tmp_path / name, "w") as z:
                for info in src.infolist():
                    data = src.read(info)
                    if info.filename.endswith("model_constants_config.json"):
                        data = json.dumps({"config": {"x": {"path_name": "opaque_obj_0", "is_param": False,
                                                            "use_pickle": False, "tensor_meta": meta}}}).encode()
                    z.writestr(info.filename, data)
                z.writestr(f"{prefix}/data/constants/opaque_obj_0", payload)
            assert_user_error(capsys, "layers", tmp_path / name, match="can run code")
            assert not marker.exists()
    # the untouched archive of the same program opens (the check refuses payloads, not the format)
    code, out, err = run_cli(capsys, "layers", program_archive, "--json")
    assert code == 0, err
    assert [layer["name"] for layer in json.loads(out)["layers"]] == ["conv1", "conv2"]


def test_an_aoti_package_named_like_weights_never_loads_its_library(tmp_path, capsys):
    """torch's C++ loader dlopens a package's .so whatever the file's name; cifarbench opens packages only as
    .pt2, the name the help's security note is about."""
    marker = tmp_path / "pwned"
    so = tmp_path / "model.so"
    if shutil.which("gcc"):
        (tmp_path / "evil.c").write_text('#include <stdlib.h>\n__attribute__((constructor)) static void f(void)'
                                         f'{{ system("touch {marker}"); }}\n')
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(so), str(tmp_path / "evil.c")], check=True)
    else:  # no compiler: the refusal is still checked, the library is junk
        so.write_bytes(b"\x7fELF junk")
    with zipfile.ZipFile(tmp_path / "weights.pt", "w") as z:
        z.write(so, "archive/data/aotinductor/model/cabc.so")
        z.writestr("archive/data/aotinductor/model/cabc_metadata.json", '{"AOTI_DEVICE_KEY": "cpu"}')
        z.writestr("archive/.data/version", "1\n")
    line = assert_user_error(capsys, "layers", tmp_path / "weights.pt", match="AOTInductor package")
    assert "rename it to .pt2" in line
    assert not marker.exists()


def test_a_model_without_convolutions_occludes_in_auto_mode(tmp_path, capsys):
    """An MLP has no conv FLOPs for auto's cost rule to divide by: auto runs dense and says why."""
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 10))
    path = _onnx(mlp.eval(), tmp_path / "mlp.onnx", (torch.rand(2, 3, 32, 32),),
                 dynamic_axes={"input": {0: "N"}})
    img_path, img = _image(tmp_path)
    code, out, err = run_cli(capsys, "occlude", "--k", "8", "--stride", "4", img_path, "--model", path, "--json",
                             "--no-figures", "--out", tmp_path / "o")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["engine"]["engine"] == "dense" and "no convolution" in doc["engine"]["why"]
    ref, target = naive_map(mlp, img, 8, 4)
    assert doc["results"][0]["target"] == target
    np.testing.assert_allclose(np.load(tmp_path / "o" / "img_k8.npy"), ref, atol=1e-5)

    from cifarbench import occlusion_map

    np.testing.assert_allclose(occlusion_map(mlp, img, k=8, stride=4).map, ref, atol=1e-5)


def test_an_onnx_graph_with_several_outputs_is_refused_naming_them(tmp_path, capsys):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _small()

        def forward(self, x):
            return F.adaptive_avg_pool2d(x, 1).flatten(1), self.net(x)  # features first: width 3

    path = _onnx(Two().eval(), tmp_path / "two.onnx", (torch.rand(2, 3, 32, 32),), output_names=["feat", "logits"],
                 dynamic_axes={"input": {0: "N"}})
    line = assert_user_error(capsys, "eval", path, "--data", "synthetic:20", match="has 2 outputs")
    assert "'feat' [N, 3]" in line and "'logits' [N, 10]" in line


def test_a_four_d_output_is_named_in_quotes(tmp_path, capsys):
    class Four(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _small()

        def forward(self, x):
            return self.net(x)[:, :, None, None]

    path = _onnx(Four().eval(), tmp_path / "four.onnx", (torch.rand(2, 3, 32, 32),), output_names=["scores"],
                 dynamic_axes={"input": {0: "N"}, "scores": {0: "N"}})
    assert_user_error(capsys, "eval", path, "--data", "synthetic:20", match="output 'scores' is 4-d [N, 10, 1, 1]")


def test_an_onnx_graph_of_any_spatial_size_runs_at_the_sources_size(tmp_path, capsys):
    """dynamic_axes on H and W: eval, and occlusion on either exact engine, at S = 32 (the default)."""
    model = _small()
    path = _onnx(model, tmp_path / "any.onnx", (torch.rand(2, 3, 32, 32),),
                 dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}})
    code, out, err = run_cli(capsys, "eval", path, "--data", "synthetic:40", "--json")
    assert code == 0, err
    from cifarbench.data import load_split

    ds = load_split("synthetic:40", "test")
    with torch.no_grad():
        expected = float((model(ds.float_images()).argmax(1) == ds.labels).float().mean())
    assert json.loads(out)["accuracy"] == pytest.approx(expected)
    img_path, img = _image(tmp_path, 3)
    ref, _ = naive_map(model, img, 8, 4)
    for mode in ("dense", "incremental"):
        code, out, err = run_cli(capsys, "occlude", "--k", "8", "--stride", "4", img_path, "--model", path,
                                 "--mode", mode, "--json", "--no-figures", "--out", tmp_path / mode)
        assert code == 0, err
        np.testing.assert_allclose(np.load(tmp_path / mode / "img_k8.npy"), ref, atol=1e-5)


@pytest.mark.parametrize("prefix", ["model.", "_orig_mod.", "module._orig_mod."])
def test_state_dicts_saved_through_a_wrapper_load_with_the_prefix_stripped(tmp_path, prefix):
    """Lightning (self.model), torch.compile (_orig_mod.) and DataParallel (module.) prefix every key."""
    from cifarbench.source import resolve_source

    model = _small()
    (tmp_path / "arch.py").write_text("from test_hostile_model_files import Small\n\ndef small():\n"
                                      "    return Small()\n")
    torch.save({"state_dict": {prefix + k: v for k, v in model.state_dict().items()}}, tmp_path / "w.ckpt")
    src = resolve_source(tmp_path / "w.ckpt", arch=f"{tmp_path / 'arch.py'}:small")
    assert src.provenance["stripped_prefix"] == prefix
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(src.torch_module()(x), model(x), atol=1e-6)


def test_a_model_with_a_hundred_unnamed_classes_gives_a_short_error(tmp_path, capsys):
    class Hundred(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 100, 3)

        def forward(self, x):
            return self.c(x).mean((2, 3))

    path = _onnx(Hundred().eval(), tmp_path / "c100.onnx", (torch.rand(2, 3, 32, 32),),
                 dynamic_axes={"input": {0: "N"}})
    line = assert_user_error(capsys, "eval", path, "--data", "synthetic:20", match="not among the model's classes")
    assert len(line) < 400 and "(100 in all)" in line and "--classes" in line


def test_a_one_channel_model_is_told_about_channels_not_sizes(tmp_path, capsys):
    torch.manual_seed(0)
    gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    torch.jit.save(torch.jit.trace(gray, torch.rand(2, 1, 32, 32)), str(tmp_path / "gray.ts"))
    line = assert_user_error(capsys, "eval", tmp_path / "gray.ts", "--data", "synthetic:20", match="3 channels")
    assert "--input-size" not in line and "[N, 3, 32, 32]" in line
