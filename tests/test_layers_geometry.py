"""Receptive fields of users' own models, per axis, through ops the geometry knows exactly and ops it does not; and
``layers``/``mine``/``ablate`` on ``torch.export`` programs, ONNX files with colliding node names, --zero-bias on an
ONNX graph, and the hints and provenance of sharded runs. Every expected number is worked out by hand in the
comments (``r_out = r_in + (k - 1) j_in``, ``j_out = j_in s``, ``start_out = start_in + ((k - 1) / 2 - p) j_in``,
input: r 1, j 1, start 0.5), or computed here with plain torch, never taken from cifarbench's output."""
from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch

from cifarbench.errors import UserError
from cifarbench.filters import layer_table, onnx_layer_table, receptive_patch
from cli_helpers import assert_user_error, run_cli

ARCH = '''
import torch, torch.nn as nn, torch.nn.functional as F

class AdaptiveMid(nn.Module):      # conv1 -> AdaptiveAvgPool2d(8) -> conv2, at 32 px the pool is 4x4 stride 4
    def __init__(self, num_classes=10, functional=False, out=8):
        super().__init__()
        self.functional, self.out = functional, out
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1); self.pool = nn.AdaptiveAvgPool2d(out)
        self.conv2 = nn.Conv2d(4, 4, 3); self.fc = nn.Linear(4, num_classes)
    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.adaptive_avg_pool2d(x, self.out) if self.functional else self.pool(x)
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))

class Ragged(nn.Module):           # conv1 (no padding: 30 px) -> AdaptiveAvgPool2d(8): windows of 3 or 4 px
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3); self.pool = nn.AdaptiveMaxPool2d(8)
        self.conv2 = nn.Conv2d(4, 4, 3); self.fc = nn.Linear(4, num_classes)
    def forward(self, x):
        return self.fc(F.relu(self.conv2(self.pool(F.relu(self.conv1(x))))).mean((2, 3)))

class Upsampled(nn.Module):        # an interpolation, then a pixel shuffle: positions no longer map to pixels
    def __init__(self, num_classes=10, op="interpolate"):
        super().__init__()
        self.op = op
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1); self.up = nn.Upsample(scale_factor=2)
        self.shuffle = nn.PixelShuffle(2); self.conv2 = nn.Conv2d(4 if op != "shuffle" else 1, 4, 3)
        self.fc = nn.Linear(4, num_classes)
    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = {"interpolate": lambda t: F.interpolate(t, scale_factor=2.0), "module": self.up,
             "shuffle": self.shuffle}[self.op](x)
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))

class FunctionalPools(nn.Module):  # c1 (3x3 pad 1) -> F.max_pool2d(x, 2) -> c2 (3x3) -> F.avg_pool2d(x, 2) -> c3 (3x3)
    def __init__(self, num_classes=10):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = F.avg_pool2d(self.c2(F.max_pool2d(self.c1(x), 2)), 2)
        return self.fc(self.c3(x).mean((2, 3)))


class Separable(nn.Module):        # a: 1x5 kernel, pad (0, 2); b: 5x1 kernel, pad (2, 0), stride (2, 1)
    def __init__(self, num_classes=10):
        super().__init__()
        self.a = nn.Conv2d(3, 4, (1, 5), padding=(0, 2))
        self.b = nn.Conv2d(4, 4, (5, 1), padding=(2, 0), stride=(2, 1))
        self.fc = nn.Linear(4, num_classes)
    def forward(self, x):
        return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))

class SamePad(nn.Module):          # c (3x3, no pad) -> F.conv2d 4x4 padding='same' -> d (3x3, no pad)
    def __init__(self, num_classes=10):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3); self.w = nn.Parameter(torch.randn(4, 4, 4, 4) * 0.1)
        self.d = nn.Conv2d(4, 4, 3); self.fc = nn.Linear(4, num_classes)
    def forward(self, x):
        x = F.conv2d(F.relu(self.c(x)), self.w, padding="same")
        x = F.conv2d(x, self.w[:, :, :3, :3], padding="valid")
        return self.fc(F.relu(self.d(x)).mean((2, 3)))

class Tiny(nn.Module):             # conv1 + BN, max-pool, a grouped conv in nested Sequentials, a depthwise conv
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1); self.bn1 = nn.BatchNorm2d(8); self.pool = nn.MaxPool2d(2)
        self.block = nn.Sequential(nn.Sequential(nn.Conv2d(8, 8, 3, groups=2, bias=False), nn.ReLU()))
        self.dw = nn.Conv2d(8, 8, 3, stride=2, dilation=2, padding=2, groups=8); self.fc = nn.Linear(8, num_classes)
    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.dw(self.block(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

class CeilPool(nn.Module):         # c1 3x3 s2 (32 -> 15), AvgPool2d(2, 2, padding=1, ceil_mode=True) (15 -> 8), c2 3x3
    def __init__(self, num_classes=10):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2); self.pool = nn.AvgPool2d(2, 2, padding=1, ceil_mode=True)
        self.c2 = nn.Conv2d(4, 4, 3); self.fc = nn.Linear(4, num_classes)
    def forward(self, x):
        return self.fc(F.relu(self.c2(self.pool(F.relu(self.c1(x))))).mean((2, 3)))

class Padded(nn.Module):           # ZeroPad2d (left 1, top 2) -> a 3x3 -> F.pad 1 all round -> b 3x3 stride 2
    def __init__(self, num_classes=10):
        super().__init__()
        self.pad = nn.ZeroPad2d((1, 0, 2, 0)); self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(4, 4, 3, stride=2); self.fc = nn.Linear(4, num_classes)
    def forward(self, x):
        x = F.pad(F.relu(self.a(self.pad(x))), (1, 1, 1, 1))
        return self.fc(F.relu(self.b(x)).mean((2, 3)))

class Gated(nn.Module):            # squeeze-and-excitation: c1, global mean -> fc 1x1 -> sigmoid, c1 * gate -> c2
    def __init__(self, num_classes=10):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1); self.fc = nn.Conv2d(4, 4, 1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1); self.out = nn.Linear(4, num_classes)
    def forward(self, x):
        y = self.c1(x)
        g = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        return self.out(F.relu(self.c2(y * g)).mean((2, 3)))

def adaptive(num_classes=10): return AdaptiveMid(num_classes)
def ceilpool(num_classes=10): return CeilPool(num_classes)
def padded(num_classes=10): return Padded(num_classes)
def ragged(num_classes=10): return Ragged(num_classes)
def upsampled(num_classes=10): return Upsampled(num_classes)
def separable(num_classes=10): return Separable(num_classes)
def samepad(num_classes=10): return SamePad(num_classes)
def tiny(num_classes=10): return Tiny(num_classes)
'''
DATA = ("--data", "synthetic:100")   # 20 test images


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "geo_arch.py"
    path.write_text(ARCH)
    spec = importlib.util.spec_from_file_location("geo_arch_for_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.path = path
    return mod


def _net(arch, cls, seed=0, **kw):
    torch.manual_seed(seed)
    net = getattr(arch, cls)(**kw).eval()
    with torch.no_grad():   # a BatchNorm with statistics of its own, so bn(0) is not 0
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.bias.uniform_(-0.5, 0.5)
    return net


def _saved(arch, tmp_path, factory, cls, **kw):
    net = _net(arch, cls, **kw)
    path = tmp_path / f"{factory}.pt"
    torch.save(net.state_dict(), path)
    return net, [str(path), "--arch", f"{arch.path}:{factory}"]


def _geo(layer):
    return layer.rf_hw, layer.jump_hw, layer.start_hw


# ------------------------------------------------------------------------------------------- adaptive pools
@pytest.mark.parametrize("functional", [False, True])
def test_adaptive_pool_that_is_a_fixed_pool_is_followed(arch, functional):
    # conv1 k3 p1: r 3, j 1, start 0.5 + (1 - 1) = 0.5; the pool 32 -> 8 is a 4x4 stride-4 window:
    # r 3 + 3 * 1 = 6, j 4, start 0.5 + 1.5 * 1 = 2.0; conv2 k3 p0: r 6 + 2 * 4 = 14, j 4, start 2.0 + 1 * 4 = 6.0
    table = layer_table(_net(arch, "AdaptiveMid", functional=functional), 32)
    assert (table["conv2"].rf, table["conv2"].jump, table["conv2"].start) == (14, 4, 6.0)
    assert table["conv2"].out_hw == (6, 6)
    # position (1, 2): centres 6 + 4 = 10 and 6 + 8 = 14, each +-7: rows 3..17, columns 7..21
    assert receptive_patch(table["conv2"], 1, 2, 32) == (3, 7, 17, 21)


def test_adaptive_pool_to_the_same_size_is_the_identity(arch):
    table = layer_table(_net(arch, "AdaptiveMid", out=32), 32)
    assert (table["conv2"].rf, table["conv2"].jump, table["conv2"].start) == (5, 1, 1.5)  # 3 + 2, 0.5 + 1


def test_adaptive_pool_onnx_agrees(arch, tmp_path):
    import onnx

    path = tmp_path / "adaptive.onnx"
    torch.onnx.export(_net(arch, "AdaptiveMid"), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False)
    table = onnx_layer_table(onnx.load(str(path)), 32)
    conv2 = [layer for layer in table.layers.values()][1]
    assert (conv2.rf, conv2.jump, conv2.start) == (14, 4, 6.0)


@pytest.mark.parametrize("cls, kw", [("Ragged", {}), ("Upsampled", {"op": "interpolate"}),
                                     ("Upsampled", {"op": "module"}), ("Upsampled", {"op": "shuffle"})])
def test_unknown_geometry_downstream_is_unknown_never_passed_through(arch, cls, kw):
    # Ragged: conv1 leaves 30 px, and 30 -> 8 pools windows of 3 and 4 pixels: no one receptive field per position.
    # An upsampling or a pixel shuffle maps several outputs to one input position: no jump in whole pixels.
    table = layer_table(_net(arch, cls, **kw), 32)
    assert _geo(table["conv1"])[0] == (3, 3)
    conv2 = table["conv2"]
    assert conv2.rf is None and conv2.rf_hw is None and conv2.jump is None and conv2.start is None
    assert not conv2.geometry_known and "unknown" in table.note
    with pytest.raises(UserError, match="unknown"):
        receptive_patch(conv2, 0, 0, 32)


def test_constants_broadcast_and_shape_reads_keep_the_geometry():
    # input scaling by a parameter, a per-channel buffer multiplied in, x.size(0) in a view: no positions change;
    # c1 k3 p1: r 3, start 0.5; c2 k3 p0: r 5, start 1.5
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3)
            self.mean = torch.nn.Parameter(torch.zeros(1, 3, 1, 1))
            self.register_buffer("scale", torch.ones(1, 4, 1, 1))

        def forward(self, x):
            x = torch.relu(self.c1((x - self.mean.to(x.dtype)) / 0.5)) * self.scale
            return self.c2(x).view(x.size(0), -1)[:, :10]

    table = layer_table(Net().eval(), 32)
    assert [(table[n].rf, table[n].start) for n in ("c1", "c2")] == [(3, 0.5), (5, 1.5)] and not table.note


def test_layers_cli_shows_unknown_and_why(arch, tmp_path, capsys):
    _, model = _saved(arch, tmp_path, "ragged", "Ragged")
    code, out, err = run_cli(capsys, "layers", *model, "--json")
    assert code in (0, None), err
    doc = json.loads(out)
    conv2 = {d["name"]: d for d in doc["layers"]}["conv2"]
    assert conv2["receptive_field"] is None and conv2["receptive_field_hw"] is None and conv2["jump"] is None
    assert "AdaptiveMaxPool2d" in doc["note"]
    code, out, err = run_cli(capsys, "layers", *model)
    assert code in (0, None) and "unknown" in err + out


def test_mine_draws_no_box_where_the_field_is_unknown(arch, tmp_path, capsys):
    net, model = _saved(arch, tmp_path, "ragged", "Ragged")
    code, out, err = run_cli(capsys, "mine", *model, "conv1:0", "conv2:0", "--top", "2", "--show", "2", *DATA,
                             "--backend", "torch", "--json", "--out", tmp_path / "mined")
    assert code in (0, None), err
    got = {f["layer"]: f for f in json.loads(out)["filters"]}
    assert all(t["patch"] is None for t in got["conv2"]["top"]) and "unknown" in got["conv2"]["patch_unknown"]
    assert all(t["patch"] is not None for t in got["conv1"]["top"]) and "patch_unknown" not in got["conv1"]
    assert json.loads(out)["receptive_fields"] == {"conv1": 3, "conv2": None}
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "conv2:0" in warnings[0] and "unknown" in warnings[0]
    rows = (tmp_path / "mined" / "top_images.csv").read_text().splitlines()
    assert [r for r in rows if r.startswith("conv2,")][0].endswith(",,,,")   # no patch: empty cells
    assert (tmp_path / "mined" / "filters" / "conv2_filter0.png").is_file()
    # in shards (--resume runs the sharded path here) the reason is the same, not a generic one
    code, out, err = run_cli(capsys, "mine", *model, "conv1:0", "conv2:0", "--top", "2", "--show", "0", *DATA,
                             "--backend", "torch", "--json", "--resume", "--out", tmp_path / "sharded")
    assert code in (0, None), err
    sharded = {f["layer"]: f for f in json.loads(out)["filters"]}
    assert sharded["conv2"]["patch_unknown"] == got["conv2"]["patch_unknown"]


def test_functional_pools_without_a_stride_take_the_kernel_as_stride(arch):
    # c1: r 3, j 1, start 0.5; max-pool k2 (stride = kernel): r 4, j 2, start 1.0; c2 k3: r 8, j 2, start 3.0;
    # avg-pool k2: r 10, j 4, start 4.0; c3 k3: r 18, j 4, start 8.0
    table = layer_table(_net(arch, "FunctionalPools"), 32)
    assert [(t.rf, t.jump, t.start) for t in (table["c1"], table["c2"], table["c3"])] == \
        [(3, 1, 0.5), (8, 2, 3.0), (18, 4, 8.0)]


# ------------------------------------------------------------------------------------------- non-square
def test_non_square_kernels_and_strides_per_axis(arch):
    # a: k (1, 5), p (0, 2): height r 1, start 0.5; width r 5, start 0.5 + (2 - 2) = 0.5; j 1 both
    # b: k (5, 1), p (2, 0), s (2, 1): height r 1 + 4 = 5, j 2, start 0.5; width r 5, j 1, start 0.5
    table = layer_table(_net(arch, "Separable"), 32)
    assert _geo(table["a"]) == ((1, 5), (1, 1), (0.5, 0.5))
    assert _geo(table["b"]) == ((5, 5), (2, 1), (0.5, 0.5))
    assert table["a"].rf is None and table["a"].jump == 1     # one number only where both axes agree
    assert table["b"].rf == 5 and table["b"].jump is None and table["b"].out_hw == (16, 32)
    # a at (3, 7): rows 3.5 +- 0.5 -> 3..4, columns 7.5 +- 2.5 -> 5..10
    assert receptive_patch(table["a"], 3, 7, 32) == (3, 5, 4, 10)
    # b at (3, 7): rows 0.5 + 6 = 6.5 +- 2.5 -> 4..9, columns 7.5 +- 2.5 -> 5..10
    assert receptive_patch(table["b"], 3, 7, 32) == (4, 5, 9, 10)


def test_non_square_onnx_per_axis(arch, tmp_path):
    import onnx

    path = tmp_path / "sep.onnx"
    torch.onnx.export(_net(arch, "Separable"), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False)
    a, b = onnx_layer_table(onnx.load(str(path)), 32).layers.values()
    assert _geo(a) == ((1, 5), (1, 1), (0.5, 0.5)) and _geo(b) == ((5, 5), (2, 1), (0.5, 0.5))
    assert b.out_hw == (16, 32)


def test_mine_non_square_positions_and_patches(arch, tmp_path, capsys):
    net, model = _saved(arch, tmp_path, "separable", "Separable")
    code, out, err = run_cli(capsys, "mine", *model, "b:0", "--top", "3", "--show", "0", *DATA,
                             "--backend", "torch", "--json")
    assert code in (0, None), err
    from cifarbench.data import load_split

    data = load_split("synthetic:100", "test")
    maps = []
    net.b.register_forward_hook(lambda m, i, o: maps.append(o))
    with torch.no_grad():
        net(data.float_images())
    m = maps[0][:, 0]                                            # [N, 16, 32]
    resp = m.sum((1, 2))
    order = sorted(range(len(data)), key=lambda i: (-resp[i].item(), i))[:3]
    top = json.loads(out)["filters"][0]["top"]
    assert [t["index"] for t in top] == order
    for t in top:
        y, x = divmod(int(m[t["index"]].flatten().argmax()), 32)    # the map is 32 wide, 16 high
        cy, cx = 0.5 + 2 * y, 0.5 + x                               # jump (2, 1), start (0.5, 0.5), r 5 both
        assert t["patch"] == [max(round(cy - 2.5), 0), max(round(cx - 2.5), 0), min(round(cy + 2.5), 32),
                              min(round(cx + 2.5), 32)]
    assert json.loads(out)["receptive_fields"] == {"a": [1, 5], "b": 5}


# ------------------------------------------------------------------------------------------- padding='same'
def test_functional_conv_string_padding(arch, tmp_path, capsys):
    # c k3 p0: r 3, start 1.5; F.conv2d 4x4 'same' pads 3 in all, 1 before: r 6, start 1.5 + (1.5 - 1) = 2.0;
    # F.conv2d 3x3 'valid': r 8, start 3.0; d k3 p0: r 10, start 4.0
    table = layer_table(_net(arch, "SamePad"), 32)
    assert (table["d"].rf, table["d"].jump, table["d"].start) == (10, 1, 4.0)
    model = _saved(arch, tmp_path, "samepad", "SamePad")[1]
    code, out, err = run_cli(capsys, "layers", *model, "--json")
    assert code in (0, None) and "Traceback" not in err, err
    assert {d["name"]: d["receptive_field"] for d in json.loads(out)["layers"]} == {"c": 3, "d": 10}


# ------------------------------------------------------------------------------------------- torch.export
@pytest.fixture(scope="module")
def program(arch, tmp_path_factory):
    net = _net(arch, "Tiny", seed=3)
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    ep = torch.export.export(net, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("n")},))
    torch.export.save(ep, str(path))
    return net, path


def test_pt2_layers_named_by_module_path(program, capsys):
    _, path = program
    code, out, err = run_cli(capsys, "layers", path, "--json")
    assert code in (0, None), err
    layers = {d["name"]: d for d in json.loads(out)["layers"]}
    assert list(layers) == ["conv1", "block.0.0", "dw"]
    # conv1 r 3 j 1 start 0.5; pool 2: r 4, j 2, start 1.0; block k3: r 8, start 3.0;
    # dw k3 d2 (k_eff 5) s2 p2: r 8 + 4 * 2 = 16, j 4, start 3.0 + (2 - 2) * 2 = 3.0
    assert [(d["receptive_field"], d["jump"], d["start"]) for d in layers.values()] == \
        [(3, 1, 0.5), (8, 2, 3.0), (16, 4, 3.0)]
    assert (layers["block.0.0"]["filters"], layers["block.0.0"]["groups"], layers["dw"]["out_size"]) == (8, 2, 7)


def test_pt2_ablate_equals_zeroing_by_hand(program, capsys):
    net, path = program
    code, out, err = run_cli(capsys, "ablate", path, "conv1:0,1", "dw:2", "--zero-bias", *DATA, "--json")
    assert code in (0, None), err
    from cifarbench.data import load_split

    data = load_split("synthetic:100", "test")
    variant = copy.deepcopy(net)
    with torch.no_grad():
        variant.conv1.weight[[0, 1]] = 0
        variant.conv1.bias[[0, 1]] = 0
        variant.dw.weight[2] = 0
        variant.dw.bias[2] = 0
        before = net(data.float_images()).argmax(1).numpy()
        after = variant(data.float_images()).argmax(1).numpy()
    got = json.loads(out)
    labels = data.labels.numpy()
    assert got["before"]["accuracy"] == pytest.approx(np.mean(before == labels))
    assert got["after"]["accuracy"] == pytest.approx(np.mean(after == labels))
    assert "zero_bias" not in got    # a torch graph: the conv's own bias, before the BN (bn(0), DESIGN's)
    # the variant's logits themselves (a random net's predictions hardly move)
    from cifarbench.analysis.ablation import variant_runtime
    from cifarbench.runtime import open_runtime
    from cifarbench.source import resolve_source

    source = resolve_source(str(path))
    rt = open_runtime(source, backend="torch", device="cpu")
    zeroed = variant_runtime(rt, source, (("conv1", 0), ("conv1", 1), ("dw", 2)), zero_bias=True)
    x = data.float_images()
    with torch.no_grad():
        want = variant(x)
        assert not torch.allclose(want, net(x), atol=1e-4)
    assert torch.allclose(torch.as_tensor(zeroed.logits(x)).cpu(), want, atol=1e-5)


def test_pt2_mine_equals_hooks(program, capsys):
    net, path = program
    code, out, err = run_cli(capsys, "mine", path, "conv1:0", "block.0.0:1", "--top", "3", "--show", "0", *DATA,
                             "--json")
    assert code in (0, None), err
    from cifarbench.data import load_split

    data = load_split("synthetic:100", "test")
    maps = {}
    net.bn1.register_forward_hook(lambda m, i, o: maps.__setitem__("conv1", o.clone()))   # after BN, pre-ReLU
    net.block[0][0].register_forward_hook(lambda m, i, o: maps.__setitem__("block.0.0", o.clone()))
    with torch.no_grad():
        net(data.float_images())
    for f in json.loads(out)["filters"]:
        resp = maps[f["layer"]][:, f["filter"]].sum((1, 2))
        order = sorted(range(len(data)), key=lambda i: (-resp[i].item(), i))[:3]
        assert [t["index"] for t in f["top"]] == order
        assert np.allclose([t["response"] for t in f["top"]], resp[order].tolist(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- ONNX by hand
def _onnx_chain(path, names, bn=False):
    """A hand-made ONNX: convs named ``names`` (3x3, pad 1, 4 -> 4 channels after a 3 -> 4 first), each with a
    bias, optionally a BatchNormalization after the first, then ReLU, global pool, flatten, a 4 -> 10 Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i, name in enumerate(names):
        cin = 3 if i == 0 else 4
        inits += [numpy_helper.from_array(rng.normal(0, 0.3, (4, cin, 3, 3)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.3, 4).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=name, pads=[1, 1, 1, 1],
                                      kernel_shape=[3, 3]))
        x = f"c{i}"
        if bn and i == 0:
            for p, v in (("s", 1.5), ("o", 0.3), ("m", 0.2), ("v", 2.0)):
                inits.append(numpy_helper.from_array(np.full(4, v, np.float32), f"bn_{p}"))
            nodes.append(helper.make_node("BatchNormalization", [x, "bn_s", "bn_o", "bn_m", "bn_v"], ["bn"],
                                          name="bn"))
            x = "bn"
        nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    inits += [numpy_helper.from_array(rng.normal(0, 1, (10, 4)).astype(np.float32), "fw"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fb")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "hand",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(path))
    return path


def test_figure_names_never_collide():
    from cifarbench.commands.mine import figure_name

    names = [figure_name(layer, 0) for layer in ("L/1", "L:1", "L_1", "l_1", "/conv1/Conv", "x" * 300)]
    assert len(set(names)) == len(names) and names[2] == "filters/L_1_filter0.png"
    assert all(n.startswith("filters/") and "/" not in n[len("filters/"):] and len(n) < 120 for n in names)


def test_mine_writes_one_figure_per_layer_of_colliding_names(tmp_path, capsys):
    path = _onnx_chain(tmp_path / "names.onnx", ["L/1", "L_1", "L:1"])
    out_dir = tmp_path / "mined"
    code, out, err = run_cli(capsys, "mine", path, "L/1:0", "L_1:0", "L:1:0", "--top", "1", "--show", "1", *DATA,
                             "--out", out_dir)
    assert code in (0, None), err
    pngs = sorted(p.name for p in (out_dir / "filters").glob("*.png"))
    assert len(pngs) == 3 and "L_1_filter0.png" in pngs
    page = (out_dir / "index.html").read_text()
    assert all(f"filters/{p}" in page for p in pngs)


def test_zero_bias_on_onnx_says_what_it_zeroed(tmp_path, capsys):
    path = _onnx_chain(tmp_path / "fused.onnx", ["first", "second"], bn=True)
    code, out, err = run_cli(capsys, "ablate", path, "first:0", "second:1", "--zero-bias", *DATA, "--json")
    assert code in (0, None), err
    note = json.loads(out)["zero_bias"]
    # first feeds a BatchNormalization: its own bias, bn(0) after it; second: a bias that may hold a merged BN
    assert note["zeroed"] == {"first": "conv bias", "second": "fused bias"}
    assert "merged" in note["note"] and "bn(0)" in note["note"]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "second" in warnings[0] and "fused bias" in warnings[0]
    code, out, err = run_cli(capsys, "ablate", path, "first:0", "--zero-bias", *DATA, "--json")
    assert "zero_bias" not in json.loads(out) and "warning:" not in err   # bn(0) exactly: nothing in doubt


def test_zero_bias_on_onnx_zeroes_the_graph_bias(tmp_path):
    import onnx
    from onnx import numpy_helper

    from cifarbench.analysis.ablation import zeroed_onnx

    proto = onnx.load(str(_onnx_chain(tmp_path / "z.onnx", ["first", "second"])))
    table = onnx_layer_table(proto, 32)
    out = zeroed_onnx(proto, table, (("second", 1),), zero_bias=True)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert not inits["w1"][1].any() and inits["b1"][1] == 0 and inits["b1"][0] != 0 and inits["w1"][0].any()


# ------------------------------------------------------------------------------------------- hints, provenance
def test_five_class_state_dict_without_classes_hints_at_classes(arch, tmp_path, capsys):
    net = _net(arch, "Tiny", num_classes=5)
    path = tmp_path / "tiny5.pt"
    torch.save(net.state_dict(), path)
    for command in ("ablate", "mine"):
        line = assert_user_error(capsys, command, path, "--arch", f"{arch.path}:tiny", "--arch-kw",
                                 "num_classes=5", "conv1:0", *DATA, match="not among the model's classes")
        assert "--classes" in line


def test_sharded_provenance_names_precision_and_device(arch, tmp_path):
    from cifarbench.commands.ablate import sharded_runtime_facts
    from cifarbench.source import resolve_source

    source = resolve_source(_net(arch, "Tiny"))
    # a Ray task without --gpus-per-task sees no GPU: the CPU; torch runs fp32 there
    facts = sharded_runtime_facts(source, "torch", None, {"executor": "ray", "gpus_per_task": 0})
    assert (facts["backend"], facts["precision"], str(facts["device"])) == ("torch", "fp32", "cpu")
    facts = sharded_runtime_facts(source, "auto", None, {"executor": "ray", "gpus_per_task": 0})
    assert facts["precision"] == "fp32" and str(facts["device"]) == "cpu"   # auto: torch or its fp32 ONNX export
    onnx_source = resolve_source(str(_onnx_chain(tmp_path / "p.onnx", ["a"])))
    facts = sharded_runtime_facts(onnx_source, "auto", "cpu", {"executor": "ray", "gpus_per_task": 0})
    assert (facts["backend"], facts["precision"], str(facts["device"])) == ("onnxruntime", "fp32", "cpu")


@pytest.mark.parametrize("command", ["ablate", "mine"])
def test_sharded_run_provenance_equals_the_local_runs(arch, tmp_path, capsys, command):
    # --resume runs the shards here (executor local) through the same driver code as Ray
    _, model = _saved(arch, tmp_path, "tiny", "Tiny")
    extra = ("--top", "2", "--show", "0") if command == "mine" else ()
    code, out, err = run_cli(capsys, command, *model, "conv1:0", *DATA, "--backend", "torch", *extra, "--json")
    assert code in (0, None), err
    local = json.loads(out)["provenance"]
    code, out, err = run_cli(capsys, command, *model, "conv1:0", *DATA, "--backend", "torch", *extra, "--json",
                             "--resume", "--out", tmp_path / "sharded")
    assert code in (0, None), err
    sharded = json.loads(out)["provenance"]
    assert local["precision"] == "fp32" and local["device"]
    assert [sharded[k] for k in ("backend", "precision", "device")] == \
        [local[k] for k in ("backend", "precision", "device")]


def test_torch_probe_feeds_a_fixed_batch_graph_exactly(arch):
    # a graph that takes exactly 4 images (a static-batch torch.export): 10 images go in chunks 4, 4, 2 + 2 padding
    from cifarbench.analysis.mining import torch_probe

    net = _net(arch, "Tiny")

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = net

        def forward(self, x):
            assert len(x) == 4, len(x)
            return self.model(x)

    table = layer_table(net, 32)
    x = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = torch_probe(copy.deepcopy(Fixed()), table=table, fixed_batch=4)(x)
    with torch.no_grad():
        want = net.bn1(net.conv1(x))   # conv1's probe is bn1 (its only consumer): pre-ReLU, after BN
    s, am, mx = got["conv1"]
    assert s.shape == (10, 8) and torch.allclose(s, want.sum((2, 3)), atol=1e-3)
    assert torch.allclose(mx, want.flatten(2).amax(2), atol=1e-5)


# ------------------------------------------------------------------------------------------- every conv listed
def _pt2(net, path, batch=2, dynamic=True):
    shapes = ({0: torch.export.Dim("n")},) if dynamic else None
    ep = torch.export.export(net, (torch.zeros(batch, 3, 32, 32),), dynamic_shapes=shapes)
    torch.export.save(ep, str(path))
    return path


def test_pt2_lists_every_conv_after_an_op_of_unknown_geometry(arch, tmp_path, capsys):
    # an interpolation between conv1 and conv2: conv2's field is unknown, but conv2 is still a conv layer of the
    # program (it was dropped: `layers` listed conv1 alone, `mine conv2:0` said "unknown layer", --all mined half)
    net = _net(arch, "Upsampled")
    path = _pt2(net, tmp_path / "up.pt2")
    code, out, err = run_cli(capsys, "layers", path, "--json")
    assert code in (0, None), err
    layers = {d["name"]: d for d in json.loads(out)["layers"]}
    assert list(layers) == ["conv1", "conv2"]
    assert layers["conv1"]["receptive_field"] == 3 and layers["conv2"]["receptive_field"] is None
    assert layers["conv2"]["filters"] == 4 and layers["conv2"]["out_hw"] == [62, 62]   # 64 - 2
    code, out, err = run_cli(capsys, "mine", path, "--all", "--top", "1", "--show", "0", *DATA, "--json")
    assert code in (0, None), err
    got = json.loads(out)
    assert [(f["layer"], f["filter"]) for f in got["filters"]] == [(c, j) for c in ("conv1", "conv2")
                                                                   for j in range(4)]
    assert all(t["patch"] is None for f in got["filters"] if f["layer"] == "conv2" for t in f["top"])
    assert got["receptive_fields"] == {"conv1": 3, "conv2": None}


# ------------------------------------------------------------------------------------------- constant padding
# ZeroPad2d (left 1, top 2): start (0.5 - 2, 0.5 - 1) = (-1.5, -0.5), input 34 x 33; a k3: r 3, start (-0.5, 0.5),
# out 32 x 31; F.pad 1: start (-1.5, -0.5), 34 x 33; b k3 s2: r 5, j 2, start (-0.5, 0.5), out 16 x 16
PADDED = {"a": ((3, 3), (1, 1), (-0.5, 0.5), (32, 31)), "b": ((5, 5), (2, 2), (-0.5, 0.5), (16, 16))}


def _geo4(layer):
    return layer.rf_hw, layer.jump_hw, layer.start_hw, layer.out_hw


def test_constant_padding_has_exact_geometry_in_every_format(arch, tmp_path):
    import onnx

    from cifarbench.source import resolve_source

    net = _net(arch, "Padded")
    assert {n: _geo4(layer) for n, layer in layer_table(net, 32).layers.items()} == PADDED
    program = layer_table(resolve_source(str(_pt2(net, tmp_path / "padded.pt2"))))
    assert {n: _geo4(layer) for n, layer in program.layers.items()} == PADDED   # was: no conv layers at all
    path = tmp_path / "padded.onnx"   # the legacy exporter computes F.pad's amounts in a small subgraph
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False)
    graph = onnx_layer_table(onnx.load(str(path)), 32)
    assert any(n.op_type == "Pad" for n in onnx.load(str(path)).graph.node)
    assert [_geo4(layer) for layer in graph.layers.values()] == list(PADDED.values())
    assert not graph.note and not program.note
    # b at (0, 0): rows -0.5 +- 2.5 -> -3..2 clipped to 0..2; columns 0.5 +- 2.5 -> -2..3 clipped to 0..3
    assert receptive_patch(graph[list(graph.layers)[1]], 0, 0, 32) == (0, 0, 2, 3)


def test_reflect_padding_stays_unknown():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.b(torch.nn.functional.pad(self.a(x), (1, 1, 1, 1), mode="reflect"))

    table = layer_table(Net().eval(), 32)
    assert table["a"].rf == 3 and table["b"].rf is None and "reflect" in table.note


def test_ablate_on_a_pt2_that_starts_with_padding(arch, tmp_path, capsys):
    net = _net(arch, "Padded")
    path = _pt2(net, tmp_path / "padded.pt2")
    code, out, err = run_cli(capsys, "ablate", path, "a:0-3", *DATA, "--json")
    assert code in (0, None), err
    from cifarbench.data import load_split

    data = load_split("synthetic:100", "test")
    variant = copy.deepcopy(net)
    with torch.no_grad():
        variant.a.weight.zero_()
        after = variant(data.float_images()).argmax(1).numpy()
    assert json.loads(out)["after"]["accuracy"] == pytest.approx(np.mean(after == data.labels.numpy()))


# ------------------------------------------------------------------------------------------- global pools, gates
# c1 k3 p1: r 3, j 1, start 0.5, 32 x 32; the mean over (2, 3) is one 32 x 32 window: r 3 + 31 = 34, j 32,
# start 0.5 + 15.5 = 16.0; fc 1x1 keeps it; c2 reads c1 * gate (a 32 x 32 map times a 1 x 1 one): unknown
GATED_FC = ((34, 34), (32, 32), (16.0, 16.0), (1, 1))


@pytest.mark.parametrize("fmt", ["torch", "legacy", "legacy18"])
def test_global_mean_is_a_global_pool_and_a_gate_is_unknown_everywhere(arch, tmp_path, fmt):
    import onnx

    net = _net(arch, "Gated")
    if fmt == "torch":
        table = layer_table(net, 32)
    else:   # ReduceMean with axes as an attribute (opset 17) or as an input (opset 18, as the dynamo exporter)
        path = tmp_path / f"{fmt}.onnx"
        torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False,
                          opset_version=18 if fmt == "legacy18" else 17)
        proto = onnx.load(str(path))
        assert any(n.op_type == "ReduceMean" for n in proto.graph.node)
        table = onnx_layer_table(proto, 32)
    c1, fc, c2 = table.layers.values()
    assert _geo4(fc) == GATED_FC and _geo4(c1)[0] == (3, 3)
    assert not c2.geometry_known and "different spatial sizes" in table.note


# ------------------------------------------------------------------------------------------- ceil-mode pools
# c1 k3 s2: 32 -> 15, r 3, j 2, start 1.5. AvgPool2d(2, 2, padding=1, ceil_mode=True) on 15: ceil((15 + 2 - 2) / 2)
# + 1 = 9 windows, but the last starts at 8 * 2 = 16 >= 15 + 1, inside the end padding: dropped (PyTorch's rule,
# which ONNX Runtime follows; ONNX shape inference says 9): 8; r 3 + 1 * 2 = 5, j 4, start 1.5 + (0.5 - 1) * 2 = 0.5.
# c2 k3: 8 -> 6, r 5 + 2 * 4 = 13, j 4, start 0.5 + 1 * 4 = 4.5
CEIL_C2 = ((13, 13), (4, 4), (4.5, 4.5), (6, 6))


@pytest.fixture(scope="module")
def ceil_onnx(arch, tmp_path_factory):
    net = _net(arch, "CeilPool")
    path = tmp_path_factory.mktemp("ceil") / "ceil.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False)
    return net, path


def test_ceil_mode_pool_drops_a_window_starting_in_the_padding(arch, ceil_onnx):
    import onnx

    net, path = ceil_onnx
    with torch.no_grad():
        assert net.c2(net.pool(net.c1(torch.zeros(1, 3, 32, 32)))).shape[-2:] == (6, 6)   # torch agrees
    assert _geo4(layer_table(net, 32)["c2"]) == CEIL_C2
    c1, c2 = onnx_layer_table(onnx.load(str(path)), 32).layers.values()
    assert _geo4(c2) == CEIL_C2 and c1.out_hw == (15, 15)


def test_mine_decodes_positions_with_the_probed_maps_width(ceil_onnx, capsys):
    net, path = ceil_onnx
    code, out, err = run_cli(capsys, "mine", path, "/c2/Conv:1", "--top", "3", "--show", "0", *DATA, "--json")
    assert code in (0, None), err
    from cifarbench.data import load_split

    data = load_split("synthetic:100", "test")
    with torch.no_grad():
        m = net.c2(net.pool(torch.relu(net.c1(data.float_images()))))[:, 1]     # [N, 6, 6]
    resp = m.sum((1, 2))
    order = sorted(range(len(data)), key=lambda i: (-resp[i].item(), i))[:3]
    top = json.loads(out)["filters"][0]["top"]
    assert [t["index"] for t in top] == order
    for t in top:
        y, x = divmod(int(m[t["index"]].flatten().argmax()), 6)
        cy, cx = 4.5 + 4 * y, 4.5 + 4 * x                                        # r 13: +- 6.5
        assert t["patch"] == [max(round(cy - 6.5), 0), max(round(cx - 6.5), 0), min(round(cy + 6.5), 32),
                              min(round(cx + 6.5), 32)]


def test_onnx_probe_reports_the_width_it_read(ceil_onnx):
    # ONNX Runtime folds a Shape node into shape inference's 7: the probe counts the row it computed instead
    from cifarbench.analysis.mining import probe_for
    from cifarbench.runtime import open_runtime
    from cifarbench.source import resolve_source

    source = resolve_source(str(ceil_onnx[1]))
    rt = open_runtime(source, backend="onnxruntime", device="cpu")
    probe = probe_for(rt, source)
    probe(torch.rand(3, 3, 32, 32))
    assert probe.widths == {"/c1/Conv": 15, "/c2/Conv": 6}


# ------------------------------------------------------------------------------------------- static-batch .pt2
def test_ablate_a_static_batch_pt2_keeps_its_batch(arch, tmp_path, capsys):
    # exported for exactly 4 images: the zeroed variant must be fed 4 at a time too, like the program itself
    net = _net(arch, "Tiny", seed=5)
    path = _pt2(net, tmp_path / "tiny4.pt2", batch=4, dynamic=False)
    code, out, err = run_cli(capsys, "ablate", path, "conv1:0-7", "--zero-bias", *DATA, "--json")
    assert code in (0, None), err
    from cifarbench.data import load_split

    data = load_split("synthetic:100", "test")
    variant = copy.deepcopy(net)
    with torch.no_grad():
        variant.conv1.weight.zero_(), variant.conv1.bias.zero_()
        after = variant(data.float_images()).argmax(1).numpy()
    assert json.loads(out)["after"]["accuracy"] == pytest.approx(np.mean(after == data.labels.numpy()))


def test_mine_a_ceil_mode_model_on_the_default_backend(arch, tmp_path, capsys):
    # the ONNX exporter writes ceil-mode shapes its own checker refuses: auto runs the model on torch, one warning
    net, model = _saved(arch, tmp_path, "ceilpool", "CeilPool")
    code, out, err = run_cli(capsys, "mine", *model, "c2:1", "--top", "1", "--show", "0", *DATA, "--json")
    assert code in (0, None) and "Traceback" not in err, err
    from cifarbench.data import load_split

    data = load_split("synthetic:100", "test")
    with torch.no_grad():
        m = net.c2(net.pool(torch.relu(net.c1(data.float_images()))))[:, 1]
    best = int(m.sum((1, 2)).argmax())
    y, x = divmod(int(m[best].flatten().argmax()), 6)
    top = json.loads(out)["filters"][0]["top"][0]
    cy, cx = 4.5 + 4 * y, 4.5 + 4 * x
    assert top["index"] == best and top["patch"] == [max(round(cy - 6.5), 0), max(round(cx - 6.5), 0),
                                                    min(round(cy + 6.5), 32), min(round(cx + 6.5), 32)]
