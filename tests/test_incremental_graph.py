"""The graph-IR incremental occlusion engine against the naive loop (patch the image, run the unmodified model,
softmax), on hand-made nets that hit each geometry, the zoo nets, a CIFAR ResNet-20 and a MobileNetV2-style net.
Strides equal to (or near) K keep the naive loop short; K=5 stride 3 lands patches on odd borders."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model
from torch import nn

from cifarbench.kernels.graph import UnsupportedOp, build_graph
from cifarbench.kernels.incremental_graph import GraphOcclusion, dense_flops, plan_flops

torch.set_num_threads(1)


def naive_logits(model, images, baselines, k, stride):
    """Definition of occlusion: every patch position, the patched image through the full model."""
    _, _, h, w = images.shape
    nh, nw = (h - k) // stride + 1, (w - k) // stride + 1
    out = []
    with torch.no_grad():
        for b in range(len(images)):
            batch = []
            for p in range(nh * nw):
                y, x = (p // nw) * stride, (p % nw) * stride
                img = images[b].clone()
                img[:, y:y + k, x:x + k] = baselines[b][:, None, None]
                batch.append(img)
            batch = torch.stack(batch)
            if h * w >= 128 * 128:  # oneDNN on channels-last input: VGG-16's 49 maps at 224 px in 5.8 s, not 7.6
                batch = batch.contiguous(memory_format=torch.channels_last)
            out.append(model(batch))
    return torch.stack(out)


def check_exact(model, k, stride, size=32, images=2, chunk=23, seed=0, maps=True):
    """Logits and target-class probability maps equal the naive loop's (probabilities within 1e-5). ``maps``
    False skips the second engine call through ``probability_maps`` (the small nets test it; the 224 px ones
    only need their logits checked, at half the time)."""
    model = model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(images, 3, size, size, generator=g)
    bases = torch.rand(images, 3, generator=g)
    ref = naive_logits(model, x, bases, k, stride)
    engine = GraphOcclusion(model, "cpu", chunk=chunk, size=size)
    got = engine.logits(x, bases, k, stride)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())
    assert (torch.softmax(got, -1) - torch.softmax(ref, -1)).abs().max() <= 1e-5
    if not maps:
        return engine
    maps = engine.probability_maps(x, bases, k, stride)
    n = (size - k) // stride + 1
    with torch.no_grad():
        targets = model(x).argmax(1)
    ref_maps = torch.softmax(ref, -1)[torch.arange(images), :, targets].view(images, n, n)
    assert maps.shape == (images, n, n)
    assert (maps - ref_maps).abs().max() <= 1e-5
    return engine


def randomize_bn(model, seed=0):
    """Non-trivial BN statistics, so folding and affine nodes are exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


# ---------------------------------------------------------------- hand-made nets


class Geometry(nn.Module):
    """Strided, padded, dilated and depthwise convs, padded/ceil-mode/dilated max pools, average pools that
    exclude padding, SiLU/GELU/Hardswish, a per-channel normalization from buffers, and a global-mean head."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.c3 = nn.Conv2d(8, 12, (3, 1), padding=(1, 0))
        self.avg = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True)
        self.fc = nn.Linear(12, 10)
        self.gain = nn.Parameter(torch.rand(12) + 0.5)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = F.silu(self.c1(x))
        x = F.gelu(self.c2(x))
        x = nn.functional.hardswish(self.bn(self.dw(x)))
        x = self.pool(x)
        x = F.max_pool2d(torch.sigmoid(self.c3(x)) * self.gain.view(1, -1, 1, 1), 2, 1, dilation=2)
        x = self.avg(x)
        x = x + x + 0.1  # one map in both slots of an add: a pointwise op
        return self.fc(x.mean((2, 3)))


class Branches(nn.Module):
    """Residual adds (operator, torch.add, method), a concat of two branches reading one input, a product of two
    maps, ReLU6 / LeakyReLU / in-place ops, an average pool that counts padding, a BN that cannot be folded (its
    conv has another user), F.adaptive_avg_pool2d + torch.flatten in the head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(10, 10, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.d = nn.Conv2d(10, 10, 3, padding=1)
        self.e = nn.Conv2d(10, 10, 1)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(10 * 4, 10)

    def forward(self, x):
        x = x * 2 - 1
        y = torch.cat([F.relu6(self.a(x)), self.b(x)], dim=1)
        c = self.c(y)
        z = F.relu(self.bn(c)) + c  # the conv output feeds the BN and the add: BN stays an affine node
        z = torch.add(z, F.leaky_relu(self.d(z), 0.1))
        z = z.add(self.e(z).sigmoid() * z)
        z = F.relu(z, inplace=True)
        z = self.drop(self.pool(z))
        z = F.adaptive_avg_pool2d(z, 2)
        return self.fc(torch.flatten(z, 1))


@pytest.mark.parametrize("k,stride", [(8, 8), (5, 3), (3, 7)])
def test_geometry_net_exact(k, stride):
    torch.manual_seed(1)
    check_exact(randomize_bn(Geometry()), k, stride)


@pytest.mark.parametrize("k,stride", [(8, 8), (5, 3)])
def test_branches_net_exact(k, stride):
    torch.manual_seed(2)
    check_exact(randomize_bn(Branches()), k, stride)


def test_ir_folds_bn_and_fuses_activations_only_where_safe():
    torch.manual_seed(2)
    g = build_graph(randomize_bn(Branches()))
    kinds = [n.kind for n in g.nodes]
    assert kinds.count("concat") == 1 and kinds.count("binary") == 4  # 3 adds and 1 product
    # the BN whose conv also feeds the add stays a separate affine node
    assert any(n.fn_name == "BatchNorm2d" for n in g.nodes if n.kind == "pointwise")
    g2 = build_graph(randomize_bn(Geometry()))
    dw = [n for n in g2.nodes if n.kind == "conv" and n.groups == 8][0]
    assert "bn(folded)" in dw.post_names


@pytest.mark.parametrize("size,k,stride", [(24, 5, 4), (40, 8, 8), (33, 6, 5)])
def test_any_input_size(size, k, stride):
    """Map side (S - K) // stride + 1 for any square S the model takes."""
    torch.manual_seed(3)
    engine = check_exact(randomize_bn(Branches()), k, stride, size=size)
    assert engine.graph(size).size == (size, size)


def test_rectangular_input():
    """The two axes are planned independently: a 24 x 40 input gives a 5 x 9 map equal to the naive loop's."""
    torch.manual_seed(3)
    model = randomize_bn(Branches())
    x, bases = torch.rand(1, 3, 24, 40), torch.rand(1, 3)
    ref = naive_logits(model, x, bases, 8, 4)
    got = GraphOcclusion(model, "cpu", size=(24, 40)).logits(x, bases, 8, 4)
    assert got.shape == (1, 5 * 9, 10)
    assert (torch.softmax(got, -1) - torch.softmax(ref, -1)).abs().max() <= 1e-5


# ---------------------------------------------------------------- the zoo


@pytest.mark.parametrize("net,k,stride,overrides", [
    ("net1", 8, 8, {}), ("net2", 5, 3, {}), ("net3", 8, 8, {}), ("net4", 5, 3, {}), ("net4", 8, 8, {}),
    ("net1", 5, 3, {"stride": 2}),
])
def test_zoo_nets_exact(net, k, stride, overrides):
    check_exact(random_model(net, seed=4, **overrides), k, stride)


def test_zoo_plan_matches_chain_engine_flops():
    """On a CifarNet chain the graph plan does what kernels/incremental.py's plan does (same windows)."""
    from cifarbench.kernels.incremental import IncrementalOcclusion

    model = random_model("net4", seed=5)
    assert GraphOcclusion(model, "cpu").flops(8, 1) == IncrementalOcclusion(model, "cpu").flops(8, 1)


# ---------------------------------------------------------------- ResNet-20 and MobileNetV2


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.short(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels; projection shortcuts)."""

    def __init__(self, blocks=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv((x - 0.5) / 0.25)))
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        hidden = cin * t
        layers = [] if t == 1 else [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                    nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Small(nn.Module):
    """A MobileNetV2-style CIFAR net: stem, inverted residuals (expand 1x1, depthwise 3x3, project 1x1, residual
    add), 1x1 head conv, global pooling, dropout, linear."""

    def __init__(self):
        super().__init__()
        cfg = [(1, 16, 1), (6, 24, 2), (6, 24, 1), (6, 32, 2), (6, 32, 1)]
        layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True)]
        cin = 16
        for t, c, s in cfg:
            layers.append(InvertedResidual(cin, c, s, t))
            cin = c
        layers += [nn.Conv2d(cin, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, 10))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.mean((2, 3)))


@pytest.mark.parametrize("k,stride", [(8, 8), (5, 3)])
def test_resnet20_exact(k, stride):
    torch.manual_seed(6)
    check_exact(randomize_bn(ResNet20()), k, stride, images=1, chunk=40)


@pytest.mark.parametrize("k,stride", [(8, 8), (5, 3)])
def test_mobilenetv2_exact(k, stride):
    torch.manual_seed(7)
    check_exact(randomize_bn(MobileNetV2Small()), k, stride, images=1, chunk=40)


def test_resnet_ir_has_residual_adds_and_global_tail():
    torch.manual_seed(6)
    g = build_graph(randomize_bn(ResNet20()))
    assert sum(n.kind == "binary" for n in g.nodes) == 9
    assert all(n.kind != "pointwise" or n.fn_name for n in g.nodes)
    # the tail starts at the global pooling: the frontier is the last block's 8x8 output
    assert [g.nodes[f].shape for f in g.frontier] == [(64, 8, 8)]
    # K=8: only the 32-pixel stage saves work (the 16- and 8-pixel stages are covered), the issue's ~1.6x ceiling
    ratio = dense_flops(g) * 25 * 25 / plan_flops(g, 8, 1)
    assert 1.3 < ratio < 1.8


# ---------------------------------------------------------------- refusals


class Rolls(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.roll(self.c(x), 1, 2).mean((2, 3)))


class Upsamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(F.interpolate(self.c(x), scale_factor=2.0).amax((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.se = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        y = self.c(x)
        gate = torch.sigmoid(self.se(y.mean((2, 3))))[:, :, None, None]
        return self.fc((y * gate).mean((2, 3)))


class SpatialMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.rand(1, 1, 32, 32))
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        return self.fc((x * self.mask).mean((2, 3)))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = self.c(x).relu()
        return self.fc(torch.cat([a, a.transpose(2, 3)], 1).mean((2, 3)))


@pytest.mark.parametrize("model,op,names", [(Rolls, "roll", ""), (Upsamples, "interpolate", ""),
                                            (SqueezeExcite, "mul", ""), (SpatialMask, "mul", ""),
                                            (Transposed, "cat", "transpose")])
def test_unsupported_op_is_refused_by_name(model, op, names):
    with pytest.raises(UnsupportedOp) as info:
        GraphOcclusion(model().eval(), "cpu")
    assert op in info.value.op and f"op {info.value.op}" in str(info.value) and names in str(info.value)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        y = self.c(x)
        if y.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace it
            y = -y
        return self.fc(y.mean((2, 3)))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_untraceable_model_is_refused():
    with pytest.raises(UnsupportedOp, match="torch.fx trace"):
        GraphOcclusion(Branchy().eval(), "cpu")
    with pytest.raises(UnsupportedOp, match="TorchScript"):
        GraphOcclusion(torch.jit.script(Rolls().eval()), "cpu")


def test_model_without_class_logits_is_refused():
    with pytest.raises(UnsupportedOp, match="logits"):
        GraphOcclusion(nn.Conv2d(3, 4, 3).eval(), "cpu")


class Sneaky(nn.Module):
    """Python state in ``forward``: from call ``switch`` on it computes something else than tracing saw."""

    def __init__(self, switch):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)
        self.calls, self.switch = 0, switch

    def forward(self, x):
        self.calls += 1
        y = self.c(x)
        if self.calls >= self.switch:
            y = y * 3
        return self.fc(y.mean((2, 3)))


def test_graph_that_misreads_the_model_is_refused_at_construction():
    """Call 1 is the trace, call 2 the construction check: the IR no longer matches, so no engine."""
    with pytest.raises(UnsupportedOp, match="does not reproduce"):
        GraphOcclusion(Sneaky(switch=2).eval(), "cpu")


def test_graph_that_drifts_later_is_caught_before_any_map():
    """A mismatch that appears only later is caught by the clean-logit check of each call, never turned into a
    silently wrong map."""
    engine = GraphOcclusion(Sneaky(switch=3).eval(), "cpu")
    with pytest.raises(RuntimeError, match="does not reproduce"):
        engine.logits(torch.rand(1, 3, 32, 32), torch.full((1, 3), 0.5), 8, 8)


# ---------------------------------------------------------------- big nets (slow)


@pytest.mark.slow
def test_torchvision_vgg16_224_exact():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(8)
    model = tv.models.vgg16(weights=None).eval()
    # a 4x4 naive loop (K=32, stride 64, the last patch on the border): 49 VGG-16 passes took 14 s of the suite;
    # the benchmark checks full grids
    check_exact(model, 32, 64, size=224, images=1, chunk=16, maps=False)


@pytest.mark.slow
def test_timm_resnet18_224_exact():
    timm = pytest.importorskip("timm")
    torch.manual_seed(9)
    model = randomize_bn(timm.create_model("resnet18", pretrained=False))
    check_exact(model, 32, 32, size=224, images=1, chunk=16, maps=False)  # stride = K: a 7x7 naive loop


@pytest.mark.slow
def test_torchvision_resnet18_224_exact():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(10)
    model = randomize_bn(tv.models.resnet18(weights=None))
    check_exact(model, 32, 32, size=224, images=1, chunk=16, maps=False)
