"""The four nets of the report, built from the specs in ``models/*.json``.

Every net takes a float [0, 1] NCHW batch and owns its normalization ((x - 0.5) / 0.5), so exported artifacts and
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


class CifarNet(nn.Module):
    """One of the report's nets. ``hparams`` holds the resolved hyper-parameters; ``spec`` the zoo spec."""

    def __init__(self, spec: dict, hparams: dict):
        super().__init__()
        self.spec = spec
        self.hparams = dict(hparams)
        k, stride = int(hparams["kernel_size"]), int(hparams["stride"])
        l1, m = int(hparams["l1_oc"]), float(hparams["filter_multiplier"])
        channels = [int(l1 * m**e) for e in spec["channel_exponents"]]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin, size, ci, pi = 3, IMAGE_SIZE, 0, 0
        for item in spec["body"]:
            if item == "pool":
                pi += 1
                layers[f"pool{pi}"] = nn.MaxPool2d(2, 2)
                size //= 2
            else:
                pad = int(item["conv"]["pad"])
                layers[f"conv{ci + 1}"] = ConvBlock(cin, channels[ci], k, stride, pad, spec["batchnorm"])
                size = (size + 2 * pad - k) // stride + 1
                cin = channels[ci]
                ci += 1
            if size < 1:
                raise UserError(f"{spec['name']} with kernel_size={k}, stride={stride} shrinks the image to nothing")
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
        return self.head(self.layers((x - 0.5) / 0.5))

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
