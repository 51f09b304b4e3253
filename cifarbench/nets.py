"""The four nets of the report, built from the specs in ``models/*.json``.

Every net takes a float [0, 1] NCHW batch and owns its normalization ((x - MEAN) / STD, MEAN = STD = 0.5), so exported artifacts and
runtimes all share one input contract. Conv layers are named ``conv1..convN``; each is a :class:`ConvBlock`
(conv, BN or identity, ReLU) so analyses can reach the pre-ReLU output of any filter.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError

IMAGE_SIZE = 32
NUM_CLASSES = 10


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, pad: int, batchnorm: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
        self.bn = nn.BatchNorm2d(cout) if batchnorm else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def pre_relu(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pre_relu(x))


@dataclass(frozen=True)
class LayerGeometry:
    """Where a layer sits in input pixels: receptive-field size, jump (stride in input pixels) and the input
    coordinate of the centre of output position 0 (``start``), as in the standard r/j/start recursion."""

    rf: int
    jump: int
    start: float
    out_size: int


def body_plan(spec: dict, hparams: dict) -> tuple[list[tuple[str, int, int, int]], int, int]:
    """The body as plain numbers, no tensors: ``([(name, cin, cout, pad) per conv], channels out, image size out)``.

    The one place the architecture's arithmetic lives, shared by :class:`CifarNet` and :func:`plan_parameters`, so
    a size can be checked before anything is allocated."""
    k, stride = int(hparams["kernel_size"]), int(hparams["stride"])
    l1, m = int(hparams["l1_oc"]), float(hparams["filter_multiplier"])
    channels = [int(l1 * m**e) for e in spec["channel_exponents"]]
    convs: list[tuple[str, int, int, int]] = []
    cin, size = 3, IMAGE_SIZE
    for item in spec["body"]:
        if item == "pool":
            size //= 2
        else:
            pad, cout = int(item["conv"]["pad"]), channels[len(convs)]
            if cout < 1:
                raise UserError(f"{spec['name']} with l1_oc={l1}, filter_multiplier={m:g} gives conv{len(convs) + 1} "
                                f"{cout} filters; every conv needs at least one")
            convs.append((f"conv{len(convs) + 1}", cin, cout, pad))
            size = (size + 2 * pad - k) // stride + 1
            cin = cout
        if size < 1:
            raise UserError(f"{spec['name']} with kernel_size={k}, stride={stride} shrinks the image to nothing")
    return convs, cin, size


def plan_parameters(spec: dict, hparams: dict) -> int:
    """The parameter count :class:`CifarNet` would have, computed without building it (nothing allocated)."""
    convs, cout, size = body_plan(spec, hparams)
    k = int(hparams["kernel_size"])
    n = sum(cin * co * k * k + co + (2 * co if spec["batchnorm"] else 0) for _, cin, co, _ in convs)
    return n + (cout * size * size + 1) * 120 + (120 + 1) * 84 + (84 + 1) * NUM_CLASSES


#: the zoo nets' input normalization ((x - MEAN) / STD per channel, on [0, 1] pixels): the one place it is written
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the zoo nets' input, (x - MEAN) / STD (all channels share 0.5, so scalars suffice)."""
    return (x - MEAN[0]) / STD[0]


class CifarNet(nn.Module):
    """One of the report's nets. ``hparams`` holds the resolved hyper-parameters; ``spec`` the zoo spec."""

    def __init__(self, spec: dict, hparams: dict):
        super().__init__()
        self.spec = spec
        self.hparams = dict(hparams)
        k, stride = int(hparams["kernel_size"]), int(hparams["stride"])
        convs, cin, size = body_plan(spec, hparams)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        ci, pi = 0, 0
        for item in spec["body"]:
            if item == "pool":
                pi += 1
                layers[f"pool{pi}"] = nn.MaxPool2d(2, 2)
            else:
                name, c_in, c_out, pad = convs[ci]
                layers[name] = ConvBlock(c_in, c_out, k, stride, pad, spec["batchnorm"])
                ci += 1
        self.layers = nn.Sequential(layers)
        p = hparams.get("dropout") or 0.0
        drop = (lambda: nn.Dropout(p)) if spec["defaults"]["dropout"] is not None else nn.Identity
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * size * size, 120), nn.ReLU(inplace=True), drop(),
            nn.Linear(120, 84), nn.ReLU(inplace=True), drop(),
            nn.Linear(84, NUM_CLASSES),
        )

    @property
    def name(self) -> str:
        return self.spec["name"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.normalize(x)))

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return normalize(x)

    def conv_blocks(self) -> OrderedDict[str, ConvBlock]:
        return OrderedDict((n, m) for n, m in self.layers.named_children() if isinstance(m, ConvBlock))

    def geometry(self) -> OrderedDict[str, LayerGeometry]:
        """Receptive field of every layer of the body, from each layer's kernel, stride and padding."""
        out: OrderedDict[str, LayerGeometry] = OrderedDict()
        rf, jump, start, size = 1, 1, 0.5, IMAGE_SIZE
        for name, layer in self.layers.named_children():
            if isinstance(layer, ConvBlock):
                k, s, p = layer.conv.kernel_size[0], layer.conv.stride[0], layer.conv.padding[0]
            else:
                k, s, p = 2, 2, 0
            size = (size + 2 * p - k) // s + 1
            start = start + ((k - 1) / 2 - p) * jump
            rf = rf + (k - 1) * jump
            jump = jump * s
            out[name] = LayerGeometry(rf, jump, start, size)
        return out

    def receptive_fields(self) -> dict[str, int]:
        return {n: g.rf for n, g in self.geometry().items() if n.startswith("conv")}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: CifarNet) -> int:
    """Multiply-accumulates x 2 of one forward pass on one image (convs and linears; pooling and BN ignored)."""
    flops, size = 0, IMAGE_SIZE
    for layer in model.layers.children():
        if isinstance(layer, ConvBlock):
            c = layer.conv
            size = (size + 2 * c.padding[0] - c.kernel_size[0]) // c.stride[0] + 1
            flops += 2 * c.in_channels * c.out_channels * c.kernel_size[0] * c.kernel_size[1] * size * size
        else:
            size //= 2
    flops += sum(2 * m.in_features * m.out_features for m in model.head if isinstance(m, nn.Linear))
    return flops


def receptive_patch(geom: LayerGeometry, y: int, x: int) -> tuple[int, int, int, int]:
    """Input-pixel box ``(y0, x0, y1, x1)`` (end-exclusive) seen by feature-map position (y, x), clipped to the image."""

    def span(i: int) -> tuple[int, int]:
        centre = geom.start + i * geom.jump
        lo, hi = round(centre - geom.rf / 2), round(centre + geom.rf / 2)
        return max(lo, 0), min(hi, IMAGE_SIZE)

    (y0, y1), (x0, x1) = span(y), span(x)
    return y0, x0, y1, x1
