"""MobileNetV2 (Sandler et al. 2018) for 32x32 inputs: the stem at stride 1 and the first
stride-2 stage (24 channels) at stride 1, as kuangliu/pytorch-cifar does, so 32x32 inputs
end at 4x4 before pooling. The rest is the paper's (and torchvision's): inverted residual
blocks with ReLU6, a residual only where input and output shapes agree, no expansion
convolution in the first block (t = 1), and channel counts rounded to multiples of 8 under a
width multiplier (the 1280-channel head is never made narrower).

`width_mult` scales every layer; `channels` sets the stem, the seven stages and the head
one by one (9 numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cifarlab.models.registry import BASE_WIDTH, kaiming_init, register

# (expansion t, output channels c, blocks n, stride s) per stage, CIFAR strides.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1))
STEM, HEAD = 32, 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's rounding: to the nearest multiple of 8, never below 90 % of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def mobilenetv2_channels(width_mult: float) -> list[int]:
    """Stem, seven stages and head at `width_mult`."""
    return [make_divisible(STEM * width_mult)] + [
        make_divisible(c * width_mult) for _, c, _, _ in STAGES
    ] + [make_divisible(HEAD * max(1.0, width_mult))]


def conv_bn(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
            groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers = [conv_bn(in_channels, hidden)] if expansion != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   conv_bn(hidden, out_channels, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        width_mult: float = 1.0,
        channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        channels = list(channels) if channels is not None else mobilenetv2_channels(width_mult)
        if len(channels) != len(STAGES) + 2:
            raise ValueError(f"channels needs the stem, {len(STAGES)} stages and the head "
                             f"({len(STAGES) + 2} numbers), got {channels}")
        layers: list[nn.Module] = [conv_bn(3, channels[0], 3, 1)]
        in_channels = channels[0]
        for (t, _, n, s), width in zip(STAGES, channels[1:-1], strict=True):
            for j in range(n):
                layers.append(InvertedResidual(in_channels, width, s if j == 0 else 1, t))
                in_channels = width
        layers.append(conv_bn(in_channels, channels[-1]))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[-1], num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register(lambda width: {"width_mult": width / BASE_WIDTH})
def mobilenetv2(num_classes: int = 10, width_mult: float = 1.0,
                channels: Sequence[int] | None = None) -> MobileNetV2:
    return MobileNetV2(num_classes, width_mult, channels)
