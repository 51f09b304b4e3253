"""Hostile and mistaken models, artifacts and options (issue 12): each ends in one ``error:`` line and exit 2
before any work, or is handled correctly; caches never hand back an artifact made from other inputs.

ONNX models here are tiny graphs built with ``onnx.helper`` (a 3x3 conv, global pooling, a linear head), so each
case runs in well under a second; the int8 cache test quantizes net1 on 16 calibration images.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import assert_user_error, run_cli

REPO = Path(__file__).resolve().parents[1]
CAT = REPO / "examples" / "cat.png"


# ------------------------------------------------------------------------------------------------ tiny graphs

def tiny_onnx(size=32, classes=10, batch="N", channels=3, quantized=False, meta=None, out_dims=None):
    """[batch, channels, size, size] -> Conv(4 filters, 3x3) -> ReLU -> GlobalAveragePool -> Flatten -> Gemm ->
    [batch, classes]; ``quantized`` puts a QuantizeLinear/DequantizeLinear pair (uint8) before the conv, as a
    QDQ int8 export does. ``meta``: cifarbench metadata (``precision`` etc.)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, channels, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(size=(classes, 4)).astype(np.float32), "fw"),
             numpy_helper.from_array(rng.normal(size=classes).astype(np.float32), "fb")]
    nodes, conv_in = [], "images"
    if quantized:
        inits += [numpy_helper.from_array(np.array(1 / 255, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.uint8), "zp")]
        nodes += [helper.make_node("QuantizeLinear", ["images", "s", "zp"], ["q"], name="q"),
                  helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="dq")]
        conv_in = "dq"
    nodes += [helper.make_node("Conv", [conv_in, "w", "b"], ["c"], name="conv1"),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_dims or [batch, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in (meta or {}).items():
        model.metadata_props.add(key=f"cifarbench.{key}", value=value)
    onnx.checker.check_model(model)
    return model


def save(model, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def assert_one_error(err: str, match: str = "") -> str:
    """Exactly one ``error:`` line (a ``warning:`` line may precede it), no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    others = [line for line in err.splitlines() if line.strip() and not line.startswith(("error: ", "warning: "))]
    assert len(errors) == 1 and not others, err
    assert match.lower() in errors[0].lower(), errors[0]
    return errors[0]


# ------------------------------------------------------------------------ ONNX shapes checked when opened

@pytest.mark.parametrize("kwargs, match", [
    ({"size": 64}, "64x64"),                           # the 1x3x64x64 input
    ({"size": 64, "batch": 1}, "64x64"),
    ({"channels": 1}, "1-channel"),
    ({"out_dims": ["N", "C"]}, "fixed class count"),
])
def test_occlude_refuses_a_model_of_another_shape_before_writing(capsys, tmp_path, kwargs, match):
    model = save(tiny_onnx(**kwargs), tmp_path / "hostile.onnx")
    out = tmp_path / "maps"
    assert_user_error(capsys, "occlude", CAT, "--model", model, "--out", out, "--k", "8", match=match)
    assert not out.exists() or not any(out.iterdir())  # nothing written, not even a first .npy


@pytest.mark.parametrize("classes", [3, 100])
def test_a_model_with_another_class_count_runs_with_its_own_count(tmp_path, classes):
    """Issue 13: the class count is the model's own (was: refused unless 10); names default to class0.."""
    from cifarbench.runtime import open_runtime

    rt = open_runtime(save(tiny_onnx(classes=classes), tmp_path / "c.onnx"), device="cpu")
    assert rt.num_classes == classes and rt.classes[:2] == ("class0", "class1") and len(rt.classes) == classes
    assert rt.logits(torch.rand(3, 3, 32, 32)).shape == (3, classes)


def test_runtime_exposes_its_input_size_and_classes_and_runs_a_fixed_batch(tmp_path):
    from cifarbench.runtime import open_runtime

    rt = open_runtime(save(tiny_onnx(batch=4), tmp_path / "b4.onnx"), device="cpu")
    assert (rt.input_size, rt.num_classes, rt.max_batch) == (32, 10, 4)
    x = torch.rand(7, 3, 32, 32)  # split into 4 + 3, the 3 padded to the graph's fixed batch of 4
    ref = open_runtime(save(tiny_onnx(), tmp_path / "dyn.onnx"), device="cpu").logits(x)
    got = rt.logits(x)
    assert got.shape == (7, 10)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ precision read from the graph

def test_int8_is_detected_from_the_graph_not_the_metadata(tmp_path, capsys):
    from cifarbench.runtime import open_runtime

    qdq = open_runtime(save(tiny_onnx(quantized=True, meta={"precision": "fp32"}), tmp_path / "q.onnx"),
                       device="cpu")
    assert (qdq.precision, qdq.name) == ("int8", "onnx-int8")
    plain = open_runtime(save(tiny_onnx(), tmp_path / "plain.onnx"), device="cpu")
    assert (plain.precision, plain.name) == ("fp32", "onnxruntime")
    # an fp32 graph whose metadata claims int8: one warning, reported as fp32 (so --backend onnx-int8 quantizes
    # it, tests/test_byo_runtime.py)
    liar = save(tiny_onnx(meta={"precision": "int8"}), tmp_path / "liar.onnx")
    capsys.readouterr()
    assert open_runtime(liar, device="cpu").precision == "fp32"
    assert "metadata says int8 but its graph is fp32" in capsys.readouterr().err


def test_a_quantized_graph_labelled_fp32_is_not_quantized_again(tmp_path):
    from cifarbench.errors import UserError
    from cifarbench.export.int8 import quantize

    with pytest.raises(UserError, match="this one is int8"):
        quantize(tiny_onnx(quantized=True, meta={"precision": "fp32"}), torch.rand(4, 3, 32, 32))


def test_quantize_leaves_no_scratch_folder_and_sweeps_a_dead_runs(tmp_path, monkeypatch):
    import tempfile

    from cifarbench.export.int8 import quantize
    from cifarbench.export.onnx import graph_precision

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited: its scratch folder is stale
    stale = tmp_path / f"cifarbench-int8-{dead}.abcd1234"
    stale.mkdir()
    (stale / "pre.onnx").write_bytes(b"x" * 1000)
    q = quantize(tiny_onnx(), torch.rand(8, 3, 32, 32), keep_first_conv=False)
    assert graph_precision(q) == "int8"
    assert list(tmp_path.iterdir()) == []


def test_kill_9_during_quantization_leaves_one_folder_that_the_next_run_sweeps(tmp_path):
    """A real SIGKILL at the moment ONNX Runtime calibrates (its first request for a batch): everything the run
    had made, ONNX Runtime's own ``ort.quant.*`` folder included, is inside one pid-named scratch folder, and the
    next quantization removes it."""
    import tempfile

    from cifarbench.export.int8 import quantize

    graph = save(tiny_onnx(), tmp_path / "tiny.onnx")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code = ("import os, signal, tempfile, torch, onnx\n"
            f"tempfile.tempdir = {str(scratch)!r}\n"
            "from cifarbench.export import int8\n"
            "int8.ImageCalibrationReader.get_next = lambda self: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"int8.quantize(onnx.load({str(graph)!r}), torch.rand(4, 3, 32, 32), keep_first_conv=False)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == -9, run.stderr
    left = list(scratch.iterdir())
    assert len(left) == 1 and left[0].name.startswith("cifarbench-int8-"), left
    assert any(p.name.startswith("ort.quant.") for p in left[0].iterdir())  # the quantizer's folder is inside
    saved = tempfile.tempdir
    tempfile.tempdir = str(scratch)
    try:
        quantize(tiny_onnx(), torch.rand(4, 3, 32, 32), keep_first_conv=False)
    finally:
        tempfile.tempdir = saved
    assert list(scratch.iterdir()) == []


# --------------------------------------------------------------------------- external data escapes

def _external(location: str):
    from onnx import TensorProto

    model = tiny_onnx()
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * 3 * 3 * 3 * 4))):
        w.external_data.add(key=key, value=value)
    return model


@pytest.mark.parametrize("how", ["symlink", "dotdot", "symlinked-folder"])
def test_external_data_outside_the_model_folder_is_refused(capsys, tmp_path, how):
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(np.arange(108, dtype=np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    if how == "symlink":
        (folder / "w.bin").symlink_to(secret)
        location = "w.bin"
    elif how == "symlinked-folder":
        (folder / "sub").symlink_to(secret.parent)
        location = "sub/secret.bin"
    else:
        location = "../outside/secret.bin"
    model = save(_external(location), folder / "m.onnx")
    line = assert_user_error(capsys, "eval", model, "--backend", "auto", "--data", "synthetic:20")
    # refused by the source's own check (resolve_source) or by onnx's checker: either way, one line naming it
    assert str(model) in line and ("outside its folder" in line or "corrupt or invalid ONNX" in line), line


def test_external_data_inside_the_folder_still_loads(tmp_path):
    from cifarbench.runtime import open_runtime

    (tmp_path / "w.bin").write_bytes(np.zeros(108, np.float32).tobytes())
    rt = open_runtime(save(_external("w.bin"), tmp_path / "m.onnx"), device="cpu")
    assert rt.logits(torch.rand(2, 3, 32, 32)).shape == (2, 10)


# -------------------------------------------------------------------------------------------- devices

@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:-1", "gpu0", "cpu:0:1"])
def test_bad_device_is_one_line(capsys, device):
    line = assert_user_error(capsys, "eval", "net1", "--device", device, "--data", "synthetic:20")
    assert "valid here: cpu" in line


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
@pytest.mark.parametrize("command", [("eval", "net1"), ("occlude", str(CAT)), ("export", "net1"),
                                     ("verify", "net1"), ("bench", "net1")])
def test_absent_cuda_device_is_one_line_in_every_command(capsys, tmp_path, command):
    out = tmp_path / "out"
    args = [*command, "--device", "cuda:7"] + (["--out", out] if command[0] in ("occlude", "eval") else [])
    assert_user_error(capsys, *args, match="cuda:7")
    assert not out.exists()


def test_parse_device_accepts_what_the_machine_has():
    from cifarbench.runtime import parse_device

    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(" CPU ") == torch.device("cpu")
    assert parse_device("cuda:3", require_present=False) == torch.device("cuda", 3)
    for i in range(torch.cuda.device_count()):
        assert parse_device(f"cuda:{i}") == torch.device("cuda", i)


# -------------------------------------------------------------------------------------------- filters

@pytest.mark.parametrize("spec, match", [
    ("conv1:0-300000000", "conv1:0-300000000 out of range"),
    ("conv1:99999999999999999999999", "out of range"),
    ("conv1:" + "9" * 5000, "out of range"),  # int() refuses > 4300 digits: must not be a ValueError
    ("conv1:5-2", "reversed"),
    ("conv1:-1", "malformed"),
    ("conv1:-3-2", "malformed"),
    ("", "empty"),
])
def test_bad_filter_ranges_are_refused_before_expanding(capsys, spec, match):
    start = time.perf_counter()
    assert_user_error(capsys, "ablate", "net1", "--filters", spec, "--data", "synthetic:20", match=match)
    assert time.perf_counter() - start < 5  # was 40 s and 12 GB before the error


def test_huge_filter_range_stays_small_in_memory():
    """The issue's case in a fresh process: the command adds almost nothing to the peak RSS that importing torch,
    the CLI and net1 already cost (about 520 MB here, torch alone ~510 MB); it added 12 GB before the fix."""
    code = ("import resource\n"
            "import torch, cifarbench.cli\n"
            "from cifarbench.zoo import load_model\n"
            "load_model('net1')\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    cifarbench.cli.main(['ablate', 'net1', '--filters', 'conv1:0-300000000', '--data', "
            "'synthetic:20'])\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    status, added_kb = run.stdout.split()
    assert status == "2" and run.stderr.count("error:") == 1, run.stderr
    assert int(added_kb) < 64 * 1024, added_kb


# ------------------------------------------------------------------------------------------ security help

@pytest.mark.parametrize("command", ["eval", "export", "verify", "occlude", "ablate", "mine"])
def test_help_of_every_command_taking_a_model_says_pt2_runs_code(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.replace("│", " ").split())
    assert "shared library" in text and "runs its code" in text


def test_onnx_floor_refuses_symlinked_external_data():
    """pyproject's floor is the first onnx release that refuses symlinked external data (1.21.0; 1.20.1 read
    through the link): the installed onnx must satisfy it."""
    import tomllib

    import onnx

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(d for d in deps if d.startswith("onnx>="))
    assert floor == "onnx>=1.21"
    assert tuple(int(p) for p in onnx.__version__.split(".")[:2]) >= (1, 21)


# ---------------------------------------------------------------------------- cache keys by content

def _archive(path: Path, black: bool, n: int = 16) -> Path:
    """An image-folder archive (train/<class>/*.png, test/<class>/*.png) of ``n`` images per split, all black or
    random noise; two of these share a file name in two folders."""
    from PIL import Image

    rng = np.random.default_rng(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for i in range(n):
                pixels = np.zeros((32, 32, 3), np.uint8) if black else rng.integers(0, 256, (32, 32, 3), np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                info = tarfile.TarInfo(f"{split}/{('cat', 'dog')[i % 2]}/{i:03d}.png")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
    return path


@pytest.fixture(scope="module")
def net1():
    from conftest import random_model

    return random_model("net1")


def test_int8_cache_tells_calibration_sets_with_one_name_apart(tmp_path, net1):
    """The issue's collision: ``--calib-data data.tar.gz`` from two folders reused the first artifact."""
    from cifarbench.checkpoint import file_sha256
    from cifarbench.artifacts import cached_artifact
    from cifarbench.runtime.ort import OrtRuntime

    black = _archive(tmp_path / "black" / "data.tar.gz", black=True)
    noise = _archive(tmp_path / "noise" / "data.tar.gz", black=False)
    a = cached_artifact(net1, "onnx-int8", calib=8, calib_data=str(black))
    b = cached_artifact(net1, "onnx-int8", calib=8, calib_data=str(noise))
    assert a != b and file_sha256(a) != file_sha256(b)
    assert cached_artifact(net1, "onnx-int8", calib=8, calib_data=str(black)) == a  # same images: reused
    # and the artifacts differ where it matters: their activation scales, hence their logits
    x = torch.rand(16, 3, 32, 32)
    assert not torch.equal(OrtRuntime(a).logits(x), OrtRuntime(b).logits(x))
    assert OrtRuntime(a).metadata["calib_sha256"] != OrtRuntime(b).metadata["calib_sha256"]


def test_artifact_key_holds_weights_options_recipe_and_every_version():
    import onnx
    import onnxruntime

    from cifarbench import __version__
    from cifarbench.artifacts import artifact_key, artifact_recipe
    from cifarbench.export import INT8_RECIPE

    recipe = artifact_recipe("w" * 64, "onnx-int8", {"calib": 8, "seed": 0, "calib_sha256": "c" * 64})
    tools = recipe["toolchain"]
    assert tools["onnx"] == onnx.__version__ and tools["onnxruntime"] == onnxruntime.__version__
    assert tools["torch_runtime"] == torch.__version__ and tools["cifarbench"] == __version__
    assert tools["opset"] == "18" and recipe["recipe"] == INT8_RECIPE
    key = artifact_key(recipe)
    changed = []
    for path, value in ((("weights_sha256",), "x" * 64), (("options", "calib_sha256"), "d" * 64),
                        (("options", "calib"), 9), (("options", "seed"), 1), (("recipe",), INT8_RECIPE + "x"),
                        (("toolchain", "onnxruntime"), "0.0"), (("toolchain", "torch"), "0.0"),
                        (("toolchain", "onnx"), "0.0"), (("toolchain", "opset"), "17"),
                        (("toolchain", "cifarbench"), "0.0")):
        import copy

        other = copy.deepcopy(recipe)
        target = other
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
        changed.append(artifact_key(other))
    assert key not in changed and len(set(changed)) == len(changed)


def test_onnx_variant_cache_is_keyed_by_graph_content(net1):
    """Two graphs that claim one source checkpoint in their metadata but hold different weights: the variant of
    the second must be made from the second (the old key was the metadata's source_sha256)."""
    import onnx
    from onnx import numpy_helper

    from cifarbench.export.variants import onnx_variant

    def two_conv(seed):
        model = tiny_onnx(meta={"source_sha256": "same"})
        conv2 = onnx.helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1])
        nodes = list(model.graph.node)
        nodes[2].input[0] = "c2"  # r -> conv2 -> GlobalAveragePool
        model.graph.ClearField("node")
        model.graph.node.extend(nodes[:2] + [conv2] + nodes[2:])
        w2 = np.random.default_rng(seed).normal(size=(4, 4, 3, 3)).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(w2, "w2"))
        return model, w2

    (a, _), (b, wb) = two_conv(1), two_conv(2)
    va = onnx_variant(a, net1, (("conv1", 0),))
    vb = onnx_variant(b, net1, (("conv1", 0),))
    got = numpy_helper.to_array(next(t for t in vb.graph.initializer if t.name == "w2"))
    np.testing.assert_array_equal(got, wb)
    assert va is not vb
