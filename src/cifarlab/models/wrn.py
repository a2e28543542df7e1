"""Wide ResNets (Zagoruyko and Komodakis 2016), WRN-d-k for 32x32 inputs: a 3x3 stem of 16
channels, three stages of (d - 4) / 6 pre-activation blocks with 16k, 32k and 64k channels
(strides 1, 2, 2), a last BN-ReLU, global pooling and the classifier. A block that changes
shape has a 1x1 convolution as its shortcut, as in the authors' code; dropout between the
convolutions is off by default (`dropout`).

`widen_factor` is k; `channels` sets the stem and the three stages one by one
(default 16, 16k, 32k, 64k).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cifarlab.models.registry import kaiming_init, register, scaled


def wrn_channels(widen_factor: int) -> list[int]:
    return [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]


class WideBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.dropout(self.relu(self.bn2(self.conv1(out))))
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        widen_factor: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth {depth} is not 6n + 4")
        channels = list(channels) if channels is not None else wrn_channels(widen_factor)
        if len(channels) != 4:
            raise ValueError(f"channels needs the stem and 3 stage widths, got {channels}")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        in_channels, stages = channels[0], []
        for i, width in enumerate(channels[1:]):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(WideBlock(in_channels, width, stride, dropout))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(x))), 1))


def _width(widen_factor: int):
    return lambda width: {"channels": scaled(wrn_channels(widen_factor), width)}


@register(_width(8))
def wrn_16_8(num_classes: int = 10, widen_factor: int = 8,
             channels: Sequence[int] | None = None, dropout: float = 0.0) -> WideResNet:
    return WideResNet(16, widen_factor, num_classes, channels, dropout)


@register(_width(10))
def wrn_28_10(num_classes: int = 10, widen_factor: int = 10,
              channels: Sequence[int] | None = None, dropout: float = 0.0) -> WideResNet:
    return WideResNet(28, widen_factor, num_classes, channels, dropout)


@register(_width(2))
def wrn_40_2(num_classes: int = 10, widen_factor: int = 2,
             channels: Sequence[int] | None = None, dropout: float = 0.0) -> WideResNet:
    return WideResNet(40, widen_factor, num_classes, channels, dropout)
