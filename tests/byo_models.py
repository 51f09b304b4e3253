"""Third-party-style CIFAR classifiers for "bring your own model" tests, written the way users write them.

Nothing here knows cifarbench: no ``.name``, ``.hparams`` or ``.layers``, no normalization inside (except where a
test needs it), plain ``torch.nn`` building blocks. Each is a factory ``NAME(num_classes=10, ...)`` so a test can
name it as ``--arch tests.byo_models:NAME``. All are small enough to run a few batches of 32x32 images on one CPU
core in well under a second.

- :func:`resnet20`: the CIFAR ResNet-20 of He et al. (3 stages x 3 basic blocks, 16/32/64 channels, residual
  adds, stride-2 convs with 1x1 projection shortcuts, global average pooling).
- :func:`mobilenetv2_tiny`: MobileNetV2-style inverted residuals: 1x1 expansion, 3x3 depthwise conv
  (``groups=channels``), ReLU6, linear bottleneck, residual add when shapes allow.
- :func:`vgg_small`: a plain ``nn.Sequential`` VGG (conv-BN-ReLU, max-pool, flatten, linear); its classifier is
  sized for one ``input_size``, so it runs on that size only.
- :func:`imagenet_cnn`: a small CNN meant for ImageNet-normalized input (:data:`IMAGENET_MEAN`,
  :data:`IMAGENET_STD`); the model itself does not normalize, the caller must.
"""
from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, blocks_per_stage: int = 3, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(cin, cout, 2 if (b == 0 and i > 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10, width: int = 16) -> ResNetCifar:
    return ResNetCifar(3, width, num_classes)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),  # linear bottleneck: no activation
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Tiny(nn.Module):
    #: (expansion, out channels, repeats, first stride), a shortened MobileNetV2 table for 32x32 inputs
    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2))

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0):
        super().__init__()
        stem = max(8, int(16 * width_mult))
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, stem, 3, padding=1, bias=False),
                                                 nn.BatchNorm2d(stem), nn.ReLU6(inplace=True))]
        cin = stem
        for t, c, n, s in self.SETTINGS:
            cout = max(8, int(c * width_mult))
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = 4 * cin
        layers.append(nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.mean((2, 3)))


def mobilenetv2_tiny(num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV2Tiny:
    return MobileNetV2Tiny(num_classes, width_mult)


def vgg_small(num_classes: int = 10, input_size: int = 32, width: int = 8) -> nn.Sequential:
    """A sequential VGG whose classifier is sized for ``input_size`` (two 2x2 pools): it runs on that size only."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * w * (input_size // 4) ** 2, 32), nn.ReLU(inplace=True),
        nn.Linear(32, num_classes),
    )


class ImagenetCNN(nn.Module):
    """Trained (in the story) on ImageNet-normalized input: feed it ``(x - IMAGENET_MEAN) / IMAGENET_STD``."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(12, 24, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.features(x).amax((2, 3)))


def imagenet_cnn(num_classes: int = 10) -> ImagenetCNN:
    return ImagenetCNN(num_classes)


FACTORIES = {"resnet20": resnet20, "mobilenetv2_tiny": mobilenetv2_tiny, "vgg_small": vgg_small,
             "imagenet_cnn": imagenet_cnn}


def perturb_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (as after training), in place; returns the model in eval
    mode. Fresh BN layers are the identity up to eps, which would hide a conv/BN mix-up in a test."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model.eval()


def build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """``FACTORIES[name](**kwargs)`` with weights drawn from ``seed`` and perturbed BN, in eval mode."""
    torch.manual_seed(seed)
    return perturb_batchnorm(FACTORIES[name](**kwargs), seed)
