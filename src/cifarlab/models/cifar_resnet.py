"""He et al. (2016)'s ResNets for CIFAR, depth 6n + 2: a 3x3 stem of 16 channels, three
stages of n BasicBlocks with 16, 32 and 64 channels (strides 1, 2, 2), global pooling and
the classifier. ResNet-20, 32, 44, 56 and 110 have n = 3, 5, 7, 9 and 18.

Shortcuts are the paper's option A, free of parameters: where a stage halves the resolution
and widens, the shortcut takes every other pixel and pads the new channels with zeros. So the
parameter counts are the published ones (0.27M, 0.46M, 0.66M, 0.85M, 1.7M).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.models.registry import kaiming_init, register, scaled

CHANNELS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option A: subsample by `stride`, zero-pad the missing channels on both sides."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class CifarBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        if channels < in_channels:
            raise ValueError(f"option A shortcuts cannot narrow {in_channels} to {channels} "
                             "channels; give non-decreasing stage channels")
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = PadShortcut(in_channels, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(
        self, depth: int, num_classes: int = 10, channels: Sequence[int] = CHANNELS
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth {depth} is not 6n + 2")
        if len(channels) != 3:
            raise ValueError(f"channels needs 3 stage widths, got {list(channels)}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 1, 1, bias=False), nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        in_channels, stages = channels[0], []
        for i, width in enumerate(channels):
            blocks = []
            for j in range(n):
                blocks.append(CifarBlock(in_channels, width, 2 if i > 0 and j == 0 else 1))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _width(width: int) -> dict[str, list[int]]:
    return {"channels": scaled(CHANNELS, width)}


@register(_width)
def resnet20(num_classes: int = 10, channels: Sequence[int] = CHANNELS) -> CifarResNet:
    return CifarResNet(20, num_classes, channels)


@register(_width)
def resnet32(num_classes: int = 10, channels: Sequence[int] = CHANNELS) -> CifarResNet:
    return CifarResNet(32, num_classes, channels)


@register(_width)
def resnet44(num_classes: int = 10, channels: Sequence[int] = CHANNELS) -> CifarResNet:
    return CifarResNet(44, num_classes, channels)


@register(_width)
def resnet56(num_classes: int = 10, channels: Sequence[int] = CHANNELS) -> CifarResNet:
    return CifarResNet(56, num_classes, channels)


@register(_width)
def resnet110(num_classes: int = 10, channels: Sequence[int] = CHANNELS) -> CifarResNet:
    return CifarResNet(110, num_classes, channels)
