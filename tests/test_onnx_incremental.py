"""fp32 ONNX graphs on the layer-graph engines (kernels/onnx_module.py): the translated module against onnxruntime
running the same file, and occlusion maps of an ONNX file against a naive loop written here (patch the image, run
onnxruntime on it, softmax, read the target's probability). Small inputs (16x16) and strides near K keep the
naive loops short."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import run_cli
from torch import nn

from cifarbench.analysis.occlusion import load_image, occlusion_map
from cifarbench.errors import UserError
from cifarbench.kernels.graph import UnsupportedOp, build_graph
from cifarbench.kernels.onnx_module import onnx_module

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

torch.set_num_threads(1)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SIZE = 16


# ------------------------------------------------------------------------------------------------ models
def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # running statistics away from 0 / 1, so a BN read wrong shows
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return bn


class Chain(nn.Module):
    """conv / BN / ReLU / max-pool twice, Flatten + Linear head."""

    def __init__(self, size=SIZE):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 12, 3, padding=1), _bn(12), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(12 * (size // 4) ** 2, 10))

    def forward(self, x):
        return self.head(self.body(x))


class Residual(nn.Module):
    """A residual block (two conv-BN, Add, ReLU), a BN after an Add (not foldable), GAP + Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8), nn.ReLU())
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8)
        self.post = _bn(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        x = self.post(torch.relu(x + y))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Depthwise(nn.Module):
    """Depthwise conv + ReLU6, SiLU written as x * sigmoid(x), HardSwish, LeakyReLU, a strided dilated conv,
    constants on either side of Sub / Div, and a mean over H, W (ReduceMean) head."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = _bn(8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.dil = nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=4)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu6(self.bn(self.dw(self.c0(x))))
        x = self.pw(x)
        x = x * torch.sigmoid(x)
        x = F.hardswish(self.dil(x))
        x = F.leaky_relu(1.0 - x, 0.1) / 2.0
        return self.fc(x.mean((2, 3)))


class AvgPad(nn.Module):
    """Average pools with padding (counting the padding and not), then ceil-free max pooling; x.view(N, -1)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.p1 = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=True)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.p2 = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.fc = nn.Linear(6 * (SIZE // 2) ** 2, 10)

    def forward(self, x):
        x = self.p2(torch.tanh(self.c2(self.p1(torch.relu(self.c(x))))))
        return self.fc(x.view(x.size(0), -1))


class Concat(nn.Module):
    """Two branches concatenated on channels (an inception-style block), GAP + Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid())
        self.c = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(3, 4, 1))
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(torch.cat([self.a(x), self.b(x), self.c(x)], 1))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


MODELS = {"chain": Chain, "residual": Residual, "depthwise": Depthwise, "avgpad": AvgPad, "concat": Concat}


def make(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def export(model, path, size=SIZE, dynamic=True):
    """The legacy exporter (as users' files are often made): a dynamic batch, or a fixed batch of 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}} if dynamic else None)
    return Path(path)


def ort_run(path_or_proto, x: np.ndarray) -> np.ndarray:
    """onnxruntime on ``x``, one image a call (a fixed-batch graph takes exactly one)."""
    src = path_or_proto if isinstance(path_or_proto, (str, Path)) else path_or_proto.SerializeToString()
    session = ort.InferenceSession(str(src) if isinstance(src, Path) else src, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def assert_close(got, want, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max()), np.abs(got - want).max()


# ------------------------------------------------------------------------------------------------ translation
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dynamic", [True, False])
def test_translated_module_equals_onnxruntime(name, dynamic, tmp_path):
    path = export(make(name), tmp_path / f"{name}.onnx", dynamic=dynamic)
    module = onnx_module(onnx.load(str(path)))
    assert not module.training
    assert all(not p.requires_grad for p in module.parameters())
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 3):  # a graph exported with batch 1 still gives a module for any batch
        x = torch.rand(batch, 3, SIZE, SIZE, generator=gen) * 2 - 0.5
        with torch.no_grad():
            got = module(x).numpy()
        assert_close(got, ort_run(path, x.numpy()))
    # the IR reads the whole spatial part: no UnsupportedOp, and its dense run is the module's
    graph = build_graph(module, SIZE)
    assert graph.nodes[0].kind == "input" and len(graph.nodes) > 1
    with torch.no_grad():
        assert_close(graph.run(x)[1].numpy(), module(x).numpy())


def test_the_repos_own_export_translates(tmp_path):
    """cifarbench's export (the dynamo exporter, optimized) writes other op patterns: Reshape with a constant
    [-1, F], BN with shared initializers, Clip with initializer bounds."""
    from cifarbench.export.onnx import to_onnx_proto

    gen = torch.Generator().manual_seed(2)
    for name in ("residual", "depthwise", "concat"):  # heads that take any input size: the export probes 32x32
        proto = to_onnx_proto(make(name))
        module = onnx_module(proto)
        x = torch.rand(3, 3, 32, 32, generator=gen)
        with torch.no_grad():
            assert_close(module(x).numpy(), ort_run(proto, x.numpy()))


def graph(nodes, inits, out_shape=(None, 10), opset=17, size=8):
    """A hand-written ONNX model: input ``x`` [N, 3, size, size], output ``y``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out_shape[1]])
    g = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.5


@pytest.mark.parametrize("head", ["gemm", "gemm_plain_weights", "matmul_add", "reduce_squeeze"])
def test_heads_written_by_hand(head):
    """Gemm's alpha / beta / transB, MatMul + Add, ReduceMean + Squeeze, then Softmax, against onnxruntime."""
    body = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("HardSigmoid", ["c"], ["h"], alpha=0.3, beta=0.4),
            helper.make_node("Sub", ["k", "h"], ["s"])]
    inits = {"w": rand(6, 3, 3, 3), "b": rand(6, seed=1), "k": np.float32(0.7)}
    if head == "reduce_squeeze":
        tail = [helper.make_node("ReduceMean", ["s"], ["m"], axes=[2, 3], keepdims=1),
                helper.make_node("Squeeze", ["m", "axes"], ["f"]),
                helper.make_node("MatMul", ["f", "fw"], ["z"])]
        inits.update(axes=np.array([2, 3], np.int64), fw=rand(6, 10, seed=2))
    else:
        tail = [helper.make_node("GlobalAveragePool", ["s"], ["g"]), helper.make_node("Flatten", ["g"], ["f"])]
        if head == "gemm":
            tail.append(helper.make_node("Gemm", ["f", "fw", "fb"], ["z"], alpha=0.5, beta=2.0, transB=1))
            inits.update(fw=rand(10, 6, seed=2), fb=rand(10, seed=3))
        elif head == "gemm_plain_weights":
            tail.append(helper.make_node("Gemm", ["f", "fw", "fb"], ["z"], alpha=1.5))
            inits.update(fw=rand(6, 10, seed=2), fb=rand(1, 10, seed=3))
        else:
            tail += [helper.make_node("MatMul", ["f", "fw"], ["mm"]), helper.make_node("Add", ["mm", "fb"], ["z"])]
            inits.update(fw=rand(6, 10, seed=2), fb=rand(10, seed=3))
    model = graph(body + tail + [helper.make_node("Softmax", ["z"], ["y"], axis=1)], inits)
    x = np.random.default_rng(4).random((3, 3, 8, 8), np.float32)
    with torch.no_grad():
        got = onnx_module(model)(torch.from_numpy(x)).numpy()
    assert_close(got, ort_run(model, x))


def test_older_opsets_and_variadic_ops():
    """Clip with attribute bounds (opset 10), PRelu with a per-channel slope, Sum / Max of three inputs,
    Unsqueeze after a keepdims=0 reduction, against onnxruntime."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c"], ["k"], min=-0.3, max=0.8),
             helper.make_node("PRelu", ["c", "slope"], ["p"]),
             helper.make_node("Sum", ["c", "k", "p"], ["s"]), helper.make_node("Max", ["s", "k", "bias"], ["m"]),
             helper.make_node("ReduceMean", ["m"], ["r"], axes=[2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["r"], ["u"], axes=[2]), helper.make_node("Flatten", ["u"], ["y"])]
    model = graph(nodes, {"w": rand(10, 3, 3, 3), "slope": rand(10, 1, 1, seed=1),
                          "bias": rand(10, 1, 1, seed=2)}, opset=10)
    x = np.random.default_rng(6).random((3, 3, 8, 8), np.float32)
    module = onnx_module(model)
    with torch.no_grad():
        assert_close(module(torch.from_numpy(x)).numpy(), ort_run(model, x))
    build_graph(module, 8)  # every spatial op above is one the IR represents


def test_batch_norms_on_a_map_and_on_features():
    """A BatchNormalization the exporters did not fold: after a conv (the IR folds it), and on pooled features."""
    stats = lambda c, seed: {f"{k}{seed}": v for k, v in zip(  # noqa: E731
        ("scale", "bias", "mean", "var"), (rand(c, seed=seed) + 1, rand(c, seed=seed + 1),
                                           rand(c, seed=seed + 2), np.abs(rand(c, seed=seed + 3)) + 0.5))}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale1", "bias1", "mean1", "var1"], ["n"], epsilon=1e-3),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("BatchNormalization", ["f", "scale5", "bias5", "mean5", "var5"], ["y"])]
    model = graph(nodes, {"w": rand(10, 3, 3, 3), **stats(10, 1), **stats(10, 5)})
    x = np.random.default_rng(6).random((3, 3, 8, 8), np.float32)
    module = onnx_module(model)
    with torch.no_grad():
        assert_close(module(torch.from_numpy(x)).numpy(), ort_run(model, x))
    assert build_graph(module, 8).describe()[1] == "conv2d:conv+bn(folded)+relu"


def test_stride_1_same_padding_with_the_extra_pixel_bottom_right():
    """pads [0, 0, 1, 1] on a 2x2 kernel at stride 1 is torch's padding="same"; the IR reads it."""
    model = graph([helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
                   helper.make_node("Clip", ["c", "lo", "hi"], ["r"]),
                   helper.make_node("GlobalMaxPool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["y"])],
                  {"w": rand(10, 3, 2, 2), "lo": np.float32(-0.2), "hi": np.float32(0.9)})
    x = np.random.default_rng(5).random((2, 3, 8, 8), np.float32)
    module = onnx_module(model)
    with torch.no_grad():
        assert_close(module(torch.from_numpy(x)).numpy(), ort_run(model, x))
    assert build_graph(module, 8).nodes[1].kind == "conv"


def test_asymmetric_pads_and_unknown_ops_name_the_op():
    conv = helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1],
                            name="down")
    head = [helper.make_node("GlobalAveragePool", ["c"], ["g"]), helper.make_node("Flatten", ["g"], ["y"])]
    with pytest.raises(UnsupportedOp, match=r"Conv \(node down\).*asymmetric pads"):
        onnx_module(graph([conv] + head, {"w": rand(10, 3, 3, 3)}))
    lrn = helper.make_node("LRN", ["x"], ["c"], size=3, name="norm")
    with pytest.raises(UnsupportedOp, match=r"op LRN \(node norm\)"):
        onnx_module(graph([lrn] + head, {}, out_shape=(None, 3)))


def test_quantized_graph_is_refused():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q0"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("GlobalAveragePool", ["d"], ["g"]), helper.make_node("Flatten", ["g"], ["y"])]
    model = graph(nodes, {"s": np.float32(0.02), "z": np.uint8(128)}, out_shape=(None, 3))
    with pytest.raises(UnsupportedOp, match="QuantizeLinear.*int8"):
        onnx_module(model)


# ------------------------------------------------------------------------------------------------ occlusion
def naive_map(path, image, k, stride, target=None, mean=None, std=None, fill=0.5):
    """Definition: patch each position with ``fill`` (in [0, 1] pixels), normalize as the contract says, run
    onnxruntime, softmax, read the target's probability (default: the clean image's prediction)."""
    def probs(batch):
        x = batch.numpy()
        if mean is not None:
            x = (x - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
        z = ort_run(path, x.astype(np.float32)).astype(np.float64)
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    clean = probs(image[None])[0]
    target = int(clean.argmax()) if target is None else target
    n = (image.shape[-1] - k) // stride + 1
    patched = []
    for i in range(n):
        for j in range(n):
            x = image.clone()
            x[:, i * stride:i * stride + k, j * stride:j * stride + k] = fill
            patched.append(x)
    return probs(torch.stack(patched))[:, target].reshape(n, n), target


@pytest.mark.parametrize("name, dynamic, k, stride", [("residual", True, 4, 3), ("depthwise", False, 5, 3),
                                                      ("concat", True, 4, 4), ("avgpad", False, 3, 4)])
def test_incremental_map_of_an_onnx_file_equals_the_naive_loop(name, dynamic, k, stride, tmp_path):
    path = export(make(name, seed=3), tmp_path / f"{name}.onnx", dynamic=dynamic)
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    want, target = naive_map(path, image, k, stride)
    for backend in ("onnxruntime", "auto"):
        r = occlusion_map(path, image, k, stride=stride, mode="incremental", backend=backend, device="cpu")
        assert r.engine["engine"] == "incremental-graph" and r.engine["mode"] == "incremental"
        assert "ONNX graph translated to torch" in r.engine["graph"]
        assert r.target == target
        assert_close(r.map, want)


def test_onnx_file_with_mean_std_contract(tmp_path):
    """A graph that expects normalized input: cifarbench puts (x - mean) / std in front, for the incremental and
    the approximate engines (tau 0 in fp32 is exact) alike."""
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    path = export(make("chain", seed=4), tmp_path / "chain.onnx")
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    want, target = naive_map(path, image, 4, 3, mean=mean, std=std)
    contract = {"mean": ",".join(map(str, mean)), "std": ",".join(map(str, std))}
    r = occlusion_map(path, image, 4, stride=3, mode="incremental", device="cpu", **contract)
    assert r.engine["engine"] == "incremental-graph" and r.target == target
    assert_close(r.map, want)
    a = occlusion_map(path, image, 4, stride=3, mode="approx", device="cpu", tau=0.0, coarse=2,
                      approx_precision="fp32", **contract)
    assert a.engine["mode"] == "approx" and "ONNX" in a.engine["graph"]
    assert_close(a.map, want)


def test_auto_on_an_onnx_file_gives_the_same_map(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARBENCH_AUTO", "flops")  # the FLOP rule: nothing timed on a loaded machine
    path = export(make("residual", seed=5), tmp_path / "residual.onnx")
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(8))
    want, _ = naive_map(path, image, 4, 2)
    r = occlusion_map(path, image, 4, stride=2, mode="auto", device="cpu")
    assert r.engine["why"].startswith("auto: ")
    assert_close(r.map, want)


class Upsampled(nn.Module):
    """A spatial op the IR cannot represent (an interpolation: ONNX Resize) between two convs."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1), \
            nn.Linear(4, 10)

    def forward(self, x):
        x = F.interpolate(torch.relu(self.a(x)), scale_factor=2.0, mode="nearest")
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.b(x), 1), 1))


def test_unsupported_op_incremental_refuses_in_one_line_and_auto_goes_dense(tmp_path):
    torch.manual_seed(0)
    path = export(Upsampled().eval(), tmp_path / "up.onnx")
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    with pytest.raises(UserError) as err:
        occlusion_map(path, image, 4, stride=4, mode="incremental", device="cpu")
    message = str(err.value)
    assert "\n" not in message and "Resize" in message and "--mode dense" in message
    r = occlusion_map(path, image, 4, stride=4, mode="auto", device="cpu")
    assert r.engine["engine"] == "dense" and r.engine["backend"] == "onnxruntime"
    assert r.engine["why"].startswith("auto: dense") and "Resize" in r.engine["why"]
    want, _ = naive_map(path, image, 4, 4)
    assert_close(r.map, want)
    with pytest.raises(UserError, match="Resize"):
        occlusion_map(path, image, 4, stride=4, mode="approx", device="cpu")


def test_cli_incremental_on_an_onnx_file(tmp_path, capsys):
    path = export(make("residual", seed=6), tmp_path / "residual32.onnx", size=32)
    code, out, err = run_cli(capsys, "occlude", "--model", path, "--k", "8", "--stride", "4", "--mode",
                             "incremental", "--no-figures", "--out", tmp_path / "o", "--json", EXAMPLES / "cat.png")
    assert code == 0, err
    (r,) = json.loads(out)["results"]
    assert r["engine"]["mode"] == "incremental" and r["engine"]["engine"] == "incremental-graph"
    assert "ONNX" in r["engine"]["graph"]
    want, target = naive_map(path, load_image(EXAMPLES / "cat.png")[0], 8, 4)
    assert r["target"] == target
    assert_close(np.array(r["map"]), want)
