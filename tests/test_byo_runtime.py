"""Bring your own model through ``open_runtime`` and ``export`` (issue 13): third-party-style classifiers as a
module, a plain ONNX export (dynamic batch, and fixed batch), a state_dict with ``arch`` and a TorchScript file give
the model's own logits on normalized input; capabilities are present exactly where documented; the contract
(classes, mean/std, input size) survives export. References are the model called directly in the test."""
from __future__ import annotations

import contextlib
import io

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit calls itself deprecated
import torch

from byo_models import IMAGENET_MEAN, IMAGENET_STD, build
from cifarbench.artifacts import open_runtime

#: (factory, mean/std the model expects or None)
MODELS = {"resnet20": None, "mobilenetv2_tiny": None, "imagenet_cnn": (IMAGENET_MEAN, IMAGENET_STD)}
N = 7  # not a multiple of the fixed batch below: the last chunk is padded and its extra rows dropped
FIXED = 4


def contract(name):
    norm = MODELS[name]
    return {"mean": norm[0], "std": norm[1]} if norm else {}


def reference(model, name, x):
    """The model on its own input: ``(x - mean) / std`` written out here, per channel."""
    norm = MODELS[name]
    if norm:
        x = (x - torch.tensor(norm[0]).view(1, 3, 1, 1)) / torch.tensor(norm[1]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x)


def onnx_file(model, path, fixed=None, size=32):
    """What a user writes: the default (dynamo) exporter with a dynamic batch, or the TorchScript-based exporter
    with a fixed batch of ``fixed``."""
    example = torch.rand(fixed or 2, 3, size, size)
    with contextlib.redirect_stdout(io.StringIO()):
        if fixed:
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                              output_names=["output"])
        else:
            torch.onnx.export(model, (example,), str(path), dynamic_shapes=({0: torch.export.Dim("n")},))
    return path


@pytest.fixture(scope="module")
def models():
    return {name: build(name) for name in MODELS}


@pytest.fixture(scope="module")
def images():
    return torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("form", ["module", "onnx", "onnx-fixed", "state-dict", "torchscript"])
def test_every_form_gives_the_models_own_logits(name, form, models, images, tmp_path, monkeypatch):
    model = models[name]
    if form == "module":
        spec, kw = model, {}
    elif form == "onnx":
        spec, kw = onnx_file(model, tmp_path / f"{name}.onnx"), {}
    elif form == "onnx-fixed":
        spec, kw = onnx_file(model, tmp_path / f"{name}.onnx", fixed=FIXED), {}
    elif form == "state-dict":
        monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
        spec = tmp_path / f"{name}.pt"
        torch.save(model.state_dict(), spec)
        kw = {"arch": f"byo_models:{name}"}
    else:
        spec = tmp_path / f"{name}.ts"
        torch.jit.save(torch.jit.trace(model, images[:2]), str(spec))
        kw = {}
    rt = open_runtime(spec, "auto" if form.startswith("onnx") else "torch", device="cpu", **kw, **contract(name))
    got = rt.logits(images)
    assert got.shape == (N, 10)
    torch.testing.assert_close(got, reference(model, name, images), rtol=1e-5, atol=1e-5)
    assert rt.input_size == 32 and rt.num_classes == 10 and len(rt.classes) == 10
    assert rt.source.mean == (MODELS[name][0] if MODELS[name] else None)
    if form.startswith("onnx"):
        assert rt.name == "onnxruntime" and rt.torch_module() is None and rt.onnx_path() == spec
        assert rt.fixed_batch == (FIXED if form == "onnx-fixed" else None)
    else:
        assert rt.name == "torch" and rt.onnx_path() is None
        # the capability: a module on [0, 1] pixels, normalization inside
        with torch.no_grad():
            torch.testing.assert_close(rt.torch_module()(images), reference(model, name, images), rtol=1e-5,
                                       atol=1e-5)


def test_a_torch_source_on_onnx_runtime_runs_its_export_with_the_contract(models, images):
    model = models["imagenet_cnn"]
    rt = open_runtime(model, "onnxruntime", device="cpu", **contract("imagenet_cnn"))
    assert rt.name == "onnxruntime" and rt.onnx_path().is_file() and rt.torch_module() is None
    torch.testing.assert_close(rt.logits(images), reference(model, "imagenet_cnn", images), rtol=1e-5, atol=1e-5)
    # the artifact carries the contract, so the file alone resolves back to it
    again = open_runtime(rt.onnx_path(), device="cpu")
    assert (again.source.mean, again.source.std) == (IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(again.logits(images), rt.logits(images), rtol=0, atol=0)


def test_a_64x64_model_runs_on_torch_and_onnx_runtime(tmp_path):
    model = build("vgg_small", input_size=64)
    x = torch.rand(5, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    for rt in (open_runtime(model, "torch", device="cpu", input_size=64),
               open_runtime(onnx_file(model, tmp_path / "vgg64.onnx", fixed=2, size=64), device="cpu")):
        assert rt.input_size == 64
        torch.testing.assert_close(rt.logits(x), ref, rtol=1e-5, atol=1e-5)
        with pytest.raises(Exception, match="64, 64"):
            rt.logits(torch.rand(2, 3, 32, 32))  # a CIFAR-size batch is refused by the model's own size


def test_export_round_trips_classes_mean_std_to_onnx_and_int8(models, tmp_path):
    from cifarbench.errors import UserError
    from cifarbench.export import export
    from cifarbench.source import resolve_source

    classes = [f"c{i}" for i in range(10)]
    model = models["imagenet_cnn"]
    source = resolve_source(model, classes=classes, **contract("imagenet_cnn"))
    fp32 = export(source, "onnx", tmp_path / "m.onnx")
    calib = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # synthetic calibration set
    int8 = export(source, "onnx-int8", tmp_path / "m8.onnx", calib_images=calib)
    x = torch.rand(N, 3, 32, 32)
    for path, precision in ((fp32, "fp32"), (int8, "int8")):
        back = resolve_source(path)
        assert back.classes == tuple(classes) and back.mean == IMAGENET_MEAN and back.std == IMAGENET_STD
        assert back.input_size == 32 and back.num_classes == 10
        rt = open_runtime(path, device="cpu")
        assert rt.precision == precision
        if precision == "fp32":
            torch.testing.assert_close(rt.logits(x), reference(model, "imagenet_cnn", x), rtol=1e-5, atol=1e-5)
        else:  # quantized on normalized images: its top-1 mostly agrees with the model's own
            agree = (rt.logits(x).argmax(1) == reference(model, "imagenet_cnn", x).argmax(1)).float().mean()
            assert agree >= 5 / 7
    # an ONNX source quantizes its own file, and AOTInductor needs a torch module: one clear refusal
    assert resolve_source(export(fp32, "onnx-int8", tmp_path / "again8.onnx", calib_images=calib)).mean \
        == IMAGENET_MEAN
    with pytest.raises(UserError, match="not a torch model"):
        export(fp32, "aoti", tmp_path / "m.pt2")


def test_backends_that_cannot_run_a_source_are_refused_in_one_line(tmp_path, models):
    from cifarbench.errors import UserError

    path = onnx_file(models["resnet20"], tmp_path / "r.onnx", fixed=FIXED)
    with pytest.raises(UserError, match="runs with --backend onnxruntime or onnx-int8 or tensorrt"):
        open_runtime(path, "torch", device="cpu")


def test_an_exported_program_with_a_fixed_batch_gets_exactly_that_batch_on_torch(models, images, tmp_path):
    model = models["resnet20"]
    path = tmp_path / "r.pt2"
    torch.export.save(torch.export.export(model, (images[:FIXED],)), str(path))  # static batch of FIXED
    rt = open_runtime(path, device="cpu")  # auto: an ExportedProgram runs on torch
    assert rt.name == "torch" and rt.fixed_batch == FIXED
    seen = []
    run = rt._run
    rt._run = lambda b: seen.append(len(b)) or run(b)
    torch.testing.assert_close(rt.logits(images), reference(model, "resnet20", images), rtol=1e-5, atol=1e-5)
    assert seen == [FIXED, FIXED]  # 7 images: 4, then 3 padded to 4


def test_a_torchscript_source_exports_to_onnx_with_its_contract(models, images, tmp_path):
    from cifarbench.export import export

    model = models["imagenet_cnn"]
    script = tmp_path / "m.ts"
    torch.jit.save(torch.jit.trace(model, images[:2]), str(script))
    path = export(script, "onnx", tmp_path / "m.onnx", **contract("imagenet_cnn"))
    rt = open_runtime(path, device="cpu")
    assert rt.source.mean == IMAGENET_MEAN
    torch.testing.assert_close(rt.logits(images), reference(model, "imagenet_cnn", images), rtol=1e-5, atol=1e-5)
