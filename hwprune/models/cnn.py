"""Built-in convolutional models: ``cnn1d``, ``resnet20``, ``mobilenetv2``."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["CNN1d", "ResNet20", "MobileNetV2"]


class CNN1d(nn.Module):
    """A small 1-D conv net for MNIST-1D style signals of shape (C, L).

    Three stride-2 conv/BN/ReLU blocks, flatten, a hidden Linear and a classifier.
    """

    def __init__(self, in_channels: int = 1, length: int = 40, num_classes: int = 10,
                 width: int = 32) -> None:
        super().__init__()
        w = [width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        c, n = in_channels, length
        for out in w:
            layers += [nn.Conv1d(c, out, 5, stride=2, padding=2, bias=False), nn.BatchNorm1d(out), nn.ReLU()]
            c, n = out, (n - 1) // 2 + 1
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(c * n, 4 * width)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        return self.fc(self.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (3 stages x 3 basic blocks, widths 16/32/64 x ``width``).

    Works for any number of input channels and any input size >= 8 pixels.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16,
                 blocks: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, c = [], width
        for i, out in enumerate((width, 2 * width, 4 * width)):
            blks = []
            for b in range(blocks):
                blks.append(BasicBlock(c, out, 2 if (i > 0 and b == 0) else 1))
                c = out
            stages.append(nn.Sequential(*blks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project (+ residual)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expansion t, channels c, repeats n, stride s) for 32x32-class inputs (CIFAR variant)
MBV2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    """MobileNetV2 (CIFAR-style strides) with a width multiplier.

    Args:
        cfg: list of (t, c, n, s); defaults to :data:`MBV2_CFG`.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width_mult: float = 1.0,
                 cfg: list[tuple[int, int, int, int]] | None = None, last_channel: int = 1280) -> None:
        super().__init__()
        cfg = cfg or MBV2_CFG
        c = _make_divisible(32 * width_mult)
        last = _make_divisible(last_channel * max(1.0, width_mult))
        feats: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, c, 3, 1, 1, bias=False),
                                                nn.BatchNorm2d(c), nn.ReLU6())]
        for t, ch, n, s in cfg:
            out = _make_divisible(ch * width_mult)
            for i in range(n):
                feats.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        feats.append(nn.Sequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()))
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
