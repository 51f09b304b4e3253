"""Model sources: every format a user brings resolves to the same model, with the contract read from the model.

References are independent of cifarbench: logits from the original module, normalization written out here,
digests with hashlib over the files' bytes, file formats written by torch/onnx/safetensors themselves.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from cifarbench import open_runtime
from cifarbench.errors import UserError
from cifarbench.source import ModelSource, parse_arch_kw, resolve_source
from tests import byo_models
from tests.byo_models import IMAGENET_MEAN, IMAGENET_STD

CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARCH = {"resnet20": "tests.byo_models:resnet20", "mobilenetv2_tiny": "tests.byo_models:mobilenetv2_tiny",
        "vgg_small": "tests.byo_models:vgg_small", "imagenet_cnn": "tests.byo_models:imagenet_cnn"}


def sha256(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def build(name: str, seed: int = 0, **kw):
    if name == "timm_resnet18":
        timm = pytest.importorskip("timm")
        torch.manual_seed(seed)
        return byo_models.perturb_batchnorm(timm.create_model("resnet18", pretrained=False, num_classes=10), seed)
    return byo_models.build(name, seed, **kw)


def arch_of(name: str) -> tuple[str, dict]:
    if name == "timm_resnet18":
        return "timm:create_model", {"model_name": "resnet18", "pretrained": False, "num_classes": 10}
    return ARCH[name], {}


def quiet():
    """The exporters and TorchScript narrate and warn; keep test output readable."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def write(model, fmt: str, folder: Path, tag: str) -> tuple[Path, str | None]:
    """``model`` saved in ``fmt`` with the library that defines the format; returns (path, arch-needed)."""
    x = torch.rand(2, 3, 32, 32)
    with quiet():
        if fmt == "torchscript":
            path = folder / f"{tag}.pt"
            torch.jit.save(torch.jit.trace(model, x), str(path))
        elif fmt == "exported-program":
            path = folder / f"{tag}.pt2"
            torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("n")},)), path)
        elif fmt == "state-dict-pt":
            path = folder / f"{tag}.pth"
            torch.save(model.state_dict(), path)
        elif fmt == "state-dict-safetensors":
            from safetensors.torch import save_file

            path = folder / f"{tag}.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        elif fmt == "onnx-dynamic":
            path = folder / f"{tag}.onnx"
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["out"],
                              dynamic_axes={"input": {0: "n"}, "out": {0: "n"}})
        elif fmt == "onnx-fixed":
            path = folder / f"{tag}.onnx"
            torch.onnx.export(model, (x,), str(path), dynamo=False)  # the legacy exporter's default: batch 2
        elif fmt == "onnx-dynamo":
            path = folder / f"{tag}.onnx"
            torch.onnx.export(model, (x,), str(path))  # torch's default exporter: .onnx + .onnx.data, batch 2
        else:
            raise AssertionError(fmt)
    return path, fmt.startswith("state-dict")


KIND = {"torchscript": "torchscript", "exported-program": "exported-program", "state-dict-pt": "state-dict",
        "state-dict-safetensors": "state-dict", "onnx-dynamic": "onnx", "onnx-fixed": "onnx", "onnx-dynamo": "onnx"}


def ort_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def check_logits(source: ModelSource, model, x: torch.Tensor) -> None:
    """The source's runnable form (torch module, else the ONNX file in onnxruntime) gives the model's logits on
    the model's own input (``x`` normalized by hand when the contract says so)."""
    with torch.no_grad():
        if source.mean is not None:
            mean = torch.tensor(source.mean).view(1, 3, 1, 1)
            std = torch.tensor(source.std).view(1, 3, 1, 1)
            want = model((x - mean) / std)
        else:
            want = model(x)
        if source.module is not None:
            got = source.torch_module()(x)
        else:
            got = ort_logits(source.onnx_path, source.normalize(x))
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_tiny", "timm_resnet18"])
def test_module_source(name):
    model = build(name)
    a, b = resolve_source(model), resolve_source(model)
    assert (a.kind, a.input_size, a.num_classes, a.classes, a.fixed_batch) == ("module", 32, 10, CIFAR, None)
    # the source runs its own copy (runtimes move and cast it): the caller's module is never changed
    assert a.mean is None and a.module is not model and a.torch_module() is a.module
    assert a.digest == b.digest
    assert resolve_source(build(name, seed=1)).digest != a.digest
    assert a.provenance["runs_code"] is False
    check_logits(a, model, torch.rand(3, 3, 32, 32))


FORMATS = ["torchscript", "exported-program", "state-dict-pt", "state-dict-safetensors", "onnx-dynamic",
           "onnx-fixed"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_tiny", "timm_resnet18"])
def test_file_sources_give_the_models_logits(tmp_path, name, fmt):
    model = build(name)
    path, needs_arch = write(model, fmt, tmp_path, "a")
    arch, kw = arch_of(name) if needs_arch else (None, None)
    src = resolve_source(path, arch=arch, arch_kw=kw)
    assert src.kind == KIND[fmt]
    assert (src.input_size, src.num_classes, src.classes, src.mean) == (32, 10, CIFAR, None)
    assert src.fixed_batch == (2 if fmt == "onnx-fixed" else None)
    assert src.path == path
    assert resolve_source(path, arch=arch, arch_kw=kw).digest == src.digest
    if not needs_arch:  # a file that is the whole model: its digest is its bytes, so other weights differ
        assert src.digest == sha256(path)
    else:  # the digest also covers --arch; other weights must still give another one
        other, _ = write(build(name, seed=1), fmt, tmp_path, "b")
        assert resolve_source(other, arch=arch, arch_kw=kw).digest != src.digest
    if fmt.startswith("onnx"):
        assert src.module is None and src.onnx_path == path
    check_logits(src, model, torch.rand(2, 3, 32, 32))


def test_dynamo_onnx_with_external_data(tmp_path):
    """torch.onnx.export's default (dynamo) writes .onnx + .onnx.data with the example's batch fixed."""
    model = build("resnet20")
    path, _ = write(model, "onnx-dynamo", tmp_path, "a")
    data = path.with_name(path.name + ".data")
    assert data.is_file()
    src = resolve_source(path)
    assert (src.kind, src.input_size, src.num_classes, src.fixed_batch) == ("onnx", 32, 10, 2)
    assert src.digest == sha256(path, data)  # the weights are part of the content
    assert src.provenance["external_data"] == [data.name]
    check_logits(src, model, torch.rand(2, 3, 32, 32))
    # new weights in the data file alone change the digest
    raw = bytearray(data.read_bytes())
    raw[-4:] = b"\x00\x00\x80\x3f"
    data.write_bytes(bytes(raw))
    assert resolve_source(path).digest != src.digest
    data.unlink()
    assert data.name in one_line_error(resolve_source, path)


def test_timm_module_and_arch_from_a_third_party_package(tmp_path):
    pytest.importorskip("timm")
    model = build("timm_resnet18")
    path, _ = write(model, "state-dict-pt", tmp_path, "r18")
    src = resolve_source(path, arch="timm:create_model",
                         arch_kw=parse_arch_kw(["model_name=resnet18", "pretrained=false", "num_classes=10"]))
    assert src.provenance["arch_kw"] == {"model_name": "resnet18", "pretrained": False, "num_classes": 10}
    assert src.provenance["runs_code"] is True  # --arch imports Python code
    check_logits(src, model, torch.rand(2, 3, 32, 32))


def test_imagenet_normalized_model_gets_its_contract(tmp_path):
    model = build("imagenet_cnn")
    x = torch.rand(4, 3, 32, 32)
    by_hand = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model(by_hand)
    src = resolve_source(model, mean="0.485,0.456,0.406", std=list(IMAGENET_STD))
    assert src.mean == IMAGENET_MEAN and src.std == IMAGENET_STD
    assert torch.equal(src.normalize(x), by_hand)
    wrapped = src.torch_module()
    # the source's own copy of the user's layers, under their names (module paths for ablate/mine)
    assert wrapped.model is src.module and dict(wrapped.model.named_modules()).keys() == \
        dict(model.named_modules()).keys()
    with torch.no_grad():
        assert (wrapped(x) - want).abs().max().item() <= 1e-5
        assert (model(x) - want).abs().max().item() > 1e-3  # [0, 1] pixels would be wrong: the test can fail
    path, _ = write(model, "onnx-dynamic", tmp_path, "inet")
    onnx_src = resolve_source(path, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert (ort_logits(path, onnx_src.normalize(x)) - want).abs().max().item() <= 1e-5
    assert resolve_source(path).mean is None  # nothing said, nothing applied


def test_contract_from_cifarbench_metadata(tmp_path):
    import onnx

    model = build("imagenet_cnn", num_classes=3)
    path, _ = write(model, "onnx-dynamic", tmp_path, "m")
    proto = onnx.load(str(path))
    for key, value in {"mean": json.dumps(IMAGENET_MEAN), "std": json.dumps(IMAGENET_STD),
                       "classes": json.dumps(["cat", "dog", "bird"])}.items():
        proto.metadata_props.add(key="cifarbench." + key, value=value)
    onnx.save(proto, str(path))
    src = resolve_source(path)
    assert (src.mean, src.std, src.classes, src.num_classes) == (IMAGENET_MEAN, IMAGENET_STD, ("cat", "dog", "bird"), 3)
    assert resolve_source(path, classes="a,b,c").classes == ("a", "b", "c")  # what the user says wins
    assert "3" in one_line_error(resolve_source, path, classes="a,b")


def test_classes_names_and_counts(tmp_path):
    model = build("resnet20", num_classes=7)
    src = resolve_source(model)
    assert src.num_classes == 7 and src.classes == tuple(f"class{i}" for i in range(7))
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"n{i}" for i in range(7)) + "\n")
    assert resolve_source(model, classes=str(names)).classes == tuple(f"n{i}" for i in range(7))
    assert resolve_source(model, classes=[f"c{i}" for i in range(7)]).classes[-1] == "c6"
    msg = one_line_error(resolve_source, model, classes=",".join(CIFAR))
    assert "7" in msg and "10" in msg
    one_line_error(resolve_source, model, classes=str(tmp_path / "missing.txt"))
    one_line_error(resolve_source, model, classes="a,a,b,c,d,e,f")


def test_input_size_from_the_model(tmp_path):
    model = build("vgg_small", input_size=64)  # its classifier fits 64x64 only
    msg = one_line_error(resolve_source, model)
    assert "input_size" in msg
    src = resolve_source(model, input_size=64)
    assert src.input_size == 64 and src.input_shape == (3, 64, 64)
    check_logits(src, model, torch.rand(2, 3, 64, 64))
    path = tmp_path / "v64.onnx"
    with quiet():
        torch.onnx.export(model, (torch.rand(1, 3, 64, 64),), str(path), dynamo=False)
    onnx_src = resolve_source(path)
    assert (onnx_src.input_size, onnx_src.fixed_batch) == (64, 1)  # read from the graph, no option needed
    assert "64" in one_line_error(resolve_source, path, input_size=32)


def test_exported_program_fixed_batch_and_in_memory(tmp_path):
    model = build("mobilenetv2_tiny")
    program = torch.export.export(model, (torch.rand(3, 3, 32, 32),))  # no dynamic dims: batch 3 only
    src = resolve_source(program)
    assert (src.kind, src.fixed_batch, src.num_classes) == ("exported-program", 3, 10)
    src.torch_module().eval()  # ep.module().eval() raises in torch; the source's module must not
    check_logits(src, model, torch.rand(3, 3, 32, 32))
    graph_module = resolve_source(program.module())  # the same, handed over as a plain nn.Module
    assert (graph_module.kind, graph_module.fixed_batch, graph_module.num_classes) == ("module", 3, 10)
    check_logits(graph_module, model, torch.rand(3, 3, 32, 32))


def test_zoo_names_checkpoints_and_cifarbench_nets(tmp_path):
    from cifarbench import create_model
    from cifarbench.checkpoint import save_checkpoint

    src = resolve_source("net1")
    assert (src.kind, src.name, src.input_size, src.num_classes, src.classes, src.mean) == \
        ("zoo", "net1", 32, 10, CIFAR, None)
    assert src.digest == sha256(src.path)
    assert "normalizes" in one_line_error(resolve_source, "net1", mean="0.5,0.5,0.5", std="0.5,0.5,0.5")
    torch.manual_seed(0)
    net = create_model("net1").eval()
    ckpt = tmp_path / "run" / "best.safetensors"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, net, {"net": "net1", "hparams": net.hparams})
    for spec in (ckpt, ckpt.parent):
        c = resolve_source(spec)
        assert (c.kind, c.name, c.digest) == ("checkpoint", "net1", sha256(ckpt))
        check_logits(c, net, torch.rand(2, 3, 32, 32))
    assert resolve_source(net).mean is None
    assert "--arch" in one_line_error(resolve_source, "net1", arch="tests.byo_models:resnet20")


# ------------------------------------------------------------------------------------------------- hostile inputs

def _leave_marker(path):
    Path(path).write_text("code ran")
    return torch.nn.Identity()


class Booby(torch.nn.Module):
    """A model whose unpickling calls :func:`_leave_marker`: what a hostile whole-model .pt can do."""

    def __init__(self, marker):
        super().__init__()
        self.marker = str(marker)

    def __reduce_ex__(self, protocol):
        return (_leave_marker, (self.marker,))


def test_pickled_whole_model_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    torch.save(Booby(marker), path)
    msg = one_line_error(resolve_source, path, arch="tests.byo_models:resnet20")
    assert "weights_only" in msg and "state_dict" in msg
    assert not marker.exists()
    with pytest.raises(UserError):
        resolve_source(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.read_text() == "code ran"


def test_whole_model_pickle_of_a_real_model(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(build("resnet20"), path)
    msg = one_line_error(resolve_source, path)
    assert "torch.save(model)" in msg and "--arch" in msg


def test_state_dict_needs_a_matching_arch(tmp_path):
    model = build("resnet20")
    pt, _ = write(model, "state-dict-pt", tmp_path, "r")
    st, _ = write(model, "state-dict-safetensors", tmp_path, "r")
    for path in (pt, st):
        assert "--arch" in one_line_error(resolve_source, path)
    msg = one_line_error(resolve_source, pt, arch=ARCH["mobilenetv2_tiny"])
    assert "missing" in msg and "unexpected" in msg
    msg = one_line_error(resolve_source, st, arch=ARCH["resnet20"], arch_kw={"num_classes": 7})
    assert "fc.weight" in msg and "[10, 64] vs [7, 64]" in msg
    assert "--arch" in one_line_error(resolve_source, pt, arch_kw={"num_classes": 10})
    # a training checkpoint dict and DataParallel's "module." prefix are still the same weights
    wrapped = tmp_path / "train.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    src = resolve_source(wrapped, arch=ARCH["resnet20"])
    assert src.provenance["stripped_prefix"] == "module."
    check_logits(src, model, torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("arch, kw, needle", [
    ("resnet20", None, "PKG.MODULE:FACTORY"),
    ("no_such_module_xyz:net", None, "cannot import"),
    ("tests.byo_models:nope", None, "no attribute"),
    ("tests.byo_models:IMAGENET_MEAN", None, "not a callable"),
    ("tests.byo_models:resnet20", {"depth": 3}, "depth"),
    ("tests.byo_models:perturb_batchnorm", {"model": None}, "failed"),
    ("tests.byo_models:BasicBlock", {"cin": 3, "cout": 3, "stride": 1}, None),  # a class is a valid factory
])
def test_bad_arch(tmp_path, arch, kw, needle):
    path, _ = write(build("resnet20"), "state-dict-pt", tmp_path, "r")
    if needle is None:
        assert "does not match" in one_line_error(resolve_source, path, arch=arch, arch_kw=kw)
        return
    assert needle in one_line_error(resolve_source, path, arch=arch, arch_kw=kw)


def test_arch_from_a_python_file(tmp_path):
    code = tmp_path / "mynets.py"
    code.write_text("from tests.byo_models import resnet20\n\ndef net(classes=10):\n    return resnet20(classes)\n")
    model = build("resnet20")
    path, _ = write(model, "state-dict-pt", tmp_path, "r")
    src = resolve_source(path, arch=f"{code}:net", arch_kw=["classes=10"])
    check_logits(src, model, torch.rand(1, 3, 32, 32))
    broken = tmp_path / "broken.py"
    broken.write_text("def net(:\n")
    assert "SyntaxError" in one_line_error(resolve_source, path, arch=f"{broken}:net")


@pytest.mark.parametrize("mean, std", [("1,2", "1,1,1"), ("a,b,c", "1,1,1"), ("0,0,0", "0,1,1"),
                                       ("nan,0,0", "1,1,1"), ("0,0,0", None), (None, "1,1,1"),
                                       ("0,0,0", "-1,1,1"), ("0,0,0", "inf,1,1")])
def test_bad_mean_std(mean, std):
    one_line_error(resolve_source, build("imagenet_cnn"), mean=mean, std=std)


def test_models_that_are_not_classifiers(tmp_path):
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3)), x

    class OneLogit(torch.nn.Module):
        def forward(self, x):
            return x.mean((1, 2, 3))[:, None]

    assert "tuple" in one_line_error(resolve_source, Pair())
    assert "at least 2" in one_line_error(resolve_source, OneLogit())
    assert "[2, 3, 32, 32]" in one_line_error(resolve_source, torch.nn.Identity())
    one_line_error(resolve_source, 42)
    one_line_error(resolve_source, tmp_path / "missing.onnx")


def test_a_model_whose_output_depends_on_its_batch_is_refused_and_one_taking_one_image_runs_one_by_one():
    """Analyses batch images: a model normalizing with statistics over dim 0 would give numbers that depend on the
    chunking, so it is refused in one line; a model that runs one image but not two (``reshape(1, -1)``) is a
    fixed batch of one, and every image still gets its own logits."""
    torch.manual_seed(0)

    class BatchStats(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 10)

        def forward(self, x):
            return self.fc((x - x.mean(0, keepdim=True)).mean((2, 3)))

    class OneAtATime(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(torch.nn.functional.avg_pool2d(x, 4).reshape(1, -1))

    assert "depends on the other images in its batch" in one_line_error(resolve_source, BatchStats())
    model = OneAtATime().eval()
    source = resolve_source(model)
    assert source.fixed_batch == 1
    runtime = open_runtime(model, "torch", device="cpu")
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        want = torch.cat([model(x[i:i + 1]) for i in range(5)])
    assert torch.allclose(runtime.logits(x), want, atol=1e-6)


def test_onnx_layouts_and_broken_files(tmp_path):
    import onnx

    class Nhwc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = build("resnet20")

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    path = tmp_path / "nhwc.onnx"
    with quiet():
        torch.onnx.export(Nhwc().eval(), (torch.rand(1, 32, 32, 3),), str(path), dynamo=False)
    assert "NHWC" in one_line_error(resolve_source, path)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    assert "ONNX" in one_line_error(resolve_source, bad)
    assert "--arch" in one_line_error(resolve_source, bad, arch=ARCH["resnet20"])
    # external data that points out of the model's folder is never read
    model = build("resnet20")
    src, _ = write(model, "onnx-dynamic", tmp_path, "ext")
    proto = onnx.load(str(src))
    sub = tmp_path / "sub"
    sub.mkdir()
    onnx.save(proto, str(sub / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    check_logits(resolve_source(sub / "m.onnx"), model, torch.rand(2, 3, 32, 32))
    escaped = onnx.load(str(sub / "m.onnx"), load_external_data=False)
    for t in escaped.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../ext.onnx"
    onnx.save(escaped, str(sub / "escape.onnx"))
    assert "outside" in one_line_error(resolve_source, sub / "escape.onnx")


def test_zip_formats_told_apart_by_listing(tmp_path):
    """An AOTInductor package (listing as torch 2.14 writes it; building a real one takes a minute) is not an
    ExportedProgram, though both are .pt2 archives with the same top-level files."""
    from cifarbench.source import _zip_kind

    aoti = ["m/data/aotinductor/model/abc.wrapper.cpp", "m/data/aotinductor/model/abc.wrapper.so",
            "m/archive_format", "m/archive_version", "m/.data/version", "m/byteorder"]
    assert _zip_kind(aoti) == "aoti"
    fake = tmp_path / "fake.pt2"
    with zipfile.ZipFile(fake, "w") as z:
        for name in aoti:
            z.writestr(name, b"x")
    assert "AOTInductor" in one_line_error(resolve_source, fake)
    path, _ = write(build("resnet20"), "exported-program", tmp_path, "ep")
    with zipfile.ZipFile(path) as z:
        assert _zip_kind(z.namelist()) == "exported-program"
    junk = tmp_path / "junk.pt"
    with zipfile.ZipFile(junk, "w") as z:
        z.writestr("junk/readme.txt", b"hi")
    assert "zip" in one_line_error(resolve_source, junk)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a torch file" * 50)
    one_line_error(resolve_source, garbage)


def test_exported_program_with_pickled_payload_is_refused(tmp_path):
    """torch.export.load unpickles ``use_pickle`` weights with weights_only=False; the source refuses first."""
    path, _ = write(build("resnet20"), "exported-program", tmp_path, "ep")
    hostile = tmp_path / "hostile.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(hostile, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(info, data)
    assert "weights_only=False" in one_line_error(resolve_source, hostile)
    marker = tmp_path / "marker"
    sneaky = tmp_path / "sneaky.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(sneaky, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("sample_inputs/model.pt"):
                buf = io.BytesIO()
                torch.save(Booby(marker), buf)
                data = buf.getvalue()
            dst.writestr(info, data)
    assert "sample_inputs/model.pt" in one_line_error(resolve_source, sneaky)
    assert not marker.exists()
    with pytest.raises(Exception):  # torch.export.load itself would run the payload (then fail)
        torch.export.load(str(sneaky))
    assert marker.read_text() == "code ran"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CIFARBENCH_SLOW_TESTS"), reason="compiles an AOTInductor package "
                    "(about a minute on 2 cores); set CIFARBENCH_SLOW_TESTS=1")
def test_real_aoti_package_with_a_fixed_batch(tmp_path):
    """A package compiled for batch 2 reads a batch of 1 out of bounds unless told; the source must know."""
    model = build("resnet20")
    path = tmp_path / "r20.pt2"
    with quiet(), torch.no_grad():
        program = torch.export.export(model, (torch.rand(2, 3, 32, 32),))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    src = resolve_source(path)
    assert (src.kind, src.fixed_batch, src.input_size, src.num_classes, src.module) == ("aoti", 2, 32, 10, None)
    assert src.provenance["runs_code"] is True and src.digest == sha256(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        got = torch._inductor.aoti_load_package(str(path))(x)
        assert (got - model(x)).abs().max().item() <= 1e-4  # Inductor reorders float sums


def test_cli_arch_kw_values():
    assert parse_arch_kw(["a=1", "b=0.5,c=true", "d=None", "e=resnet18"]) == \
        {"a": 1, "b": 0.5, "c": True, "d": None, "e": "resnet18"}
    one_line_error(parse_arch_kw, ["novalue"])
    one_line_error(parse_arch_kw, ["1x=2"])


def test_source_module_stays_lazy():
    import subprocess
    import sys

    code = "import sys, cifarbench.source; print('onnx' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


ARCH_FILE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return SIGN * self.fc(self.conv(x).relu().mean((2, 3)))


SIGN = 1


def net():
    torch.manual_seed(0)
    return Net()
"""


def test_an_edited_arch_file_is_a_new_model_for_every_cache(tmp_path):
    """The weights and the --arch string are the same, the forward is not: the digest (which keys the compiled
    artifacts) must change, and the onnxruntime backend must run the edited code, not a cached export of the old."""
    arch = tmp_path / "mynet.py"
    arch.write_text(ARCH_FILE)
    spec = f"{arch}:net"
    from cifarbench.source import build_arch

    torch.save(build_arch(spec).state_dict(), tmp_path / "w.pt")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = resolve_source(tmp_path / "w.pt", arch=spec)
    first = open_runtime(tmp_path / "w.pt", "onnxruntime", device="cpu", arch=spec).logits(x)
    arch.write_text(ARCH_FILE.replace("SIGN = 1", "SIGN = -1"))
    after = resolve_source(tmp_path / "w.pt", arch=spec)
    assert after.digest != before.digest
    second = open_runtime(tmp_path / "w.pt", "onnxruntime", device="cpu", arch=spec).logits(x)
    assert torch.allclose(second, -first, atol=1e-5)


def test_a_helper_module_the_arch_file_imports_is_part_of_the_model(tmp_path):
    """The forward's behaviour lives in a module beside the --arch file (importable as `python file.py` would
    have it): editing that module must not reuse the export of the old code either."""
    import sys

    (tmp_path / "acts.py").write_text("import torch\n\ndef act(x):\n    return torch.relu(x)\n")
    (tmp_path / "withhelper.py").write_text(ARCH_FILE.replace("SIGN * self.fc(self.conv(x).relu()",
                                                              "self.fc(acts.act(self.conv(x))")
                                            .replace("import torch\n", "import torch\nimport acts\n", 1))
    spec = f"{tmp_path / 'withhelper.py'}:net"
    from cifarbench.source import build_arch

    try:
        torch.save(build_arch(spec).state_dict(), tmp_path / "w.pt")
        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        first = open_runtime(tmp_path / "w.pt", "onnxruntime", device="cpu", arch=spec).logits(x)
        (tmp_path / "acts.py").write_text("import torch\n\ndef act(x):\n    return torch.sigmoid(x) * 5\n")
        sys.modules.pop("acts", None)  # a new process would import the edited file
        model = build_arch(spec)
        model.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
        with torch.no_grad():
            want = model.eval()(x)
        second = open_runtime(tmp_path / "w.pt", "onnxruntime", device="cpu", arch=spec).logits(x)
        assert torch.allclose(second, want, atol=1e-5) and not torch.allclose(second, first, atol=1e-3)
    finally:
        sys.modules.pop("acts", None)
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))


def test_a_model_class_without_a_source_file_resolves(monkeypatch):
    """A class defined where Python keeps no file (``python -c``, some notebooks): inspect raises OSError for it;
    its digest falls back to the class's name instead of failing."""
    import sys

    monkeypatch.delattr(sys.modules["__main__"], "__file__", raising=False)  # as under python -c
    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))

    def init(self):
        torch.nn.Module.__init__(self)
        self.conv, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 10)

    cls = type("NoSource", (torch.nn.Module,), {"__init__": init, "forward": forward,
                                                "__module__": "__main__"})
    source = resolve_source(cls().eval())
    assert source.num_classes == 10 and source.digest


class _BatchCentred(torch.nn.Module):
    """Logits from features centred over the batch: what one image gets depends on the others."""

    def __init__(self, offset: float = 0.0, masked: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 10)
        self.offset, self.masked = offset, masked

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        y = self.fc(h - h.mean(0, keepdim=True)) * 4 + self.offset
        if self.masked:  # a class masked out at -inf: legitimate, softmax gives it 0
            y = torch.cat([y[:, :9], torch.full_like(y[:, 9:], float("-inf"))], 1)
        return y


@pytest.mark.parametrize("kw", [{}, {"offset": 3000.0}, {"masked": True}])
def test_batch_dependence_is_seen_through_an_offset_and_a_masked_class(kw):
    """A constant added to every logit changes no probability, and a -inf class is a legitimate mask: neither may
    hide that the other images move an image's logits."""
    assert "depends on the other images in its batch" in one_line_error(resolve_source, _BatchCentred(**kw))


def test_onnx_graphs_are_probed_too(tmp_path):
    """An ONNX file declaring [N, C] is run once like any model: a graph holding a training-mode BatchNorm is
    refused; one declaring a dynamic batch but running one image only runs one by one, with its own logits."""
    class BNTrain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    class OneOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).reshape(1, -1))

    torch.manual_seed(0)
    dyn = {"x": {0: "n"}, "y": {0: "n"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(BNTrain().train(), (torch.rand(2, 3, 32, 32),), str(tmp_path / "bn.onnx"), dynamo=False,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                          input_names=["x"], output_names=["y"], dynamic_axes=dyn)
        one = OneOnly().eval()
        torch.onnx.export(one, (torch.rand(1, 3, 32, 32),), str(tmp_path / "one.onnx"), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes=dyn)
    assert "depends on the other images" in one_line_error(resolve_source, tmp_path / "bn.onnx")
    assert resolve_source(tmp_path / "one.onnx").fixed_batch == 1
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        want = torch.cat([one(x[i:i + 1]) for i in range(3)])
    got = open_runtime(tmp_path / "one.onnx", "onnxruntime", device="cpu").logits(x)
    assert torch.allclose(got, want, atol=1e-5)


def test_a_module_with_a_child_in_training_mode_is_copied():
    model = build("resnet20").eval()
    model.bn1.train()
    source = resolve_source(model)
    assert model.bn1.training and not any(m.training for m in source.module.modules())
