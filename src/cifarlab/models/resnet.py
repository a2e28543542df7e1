"""ResNets for 32x32 inputs: 3x3 stem at stride 1 and no max-pool (He et al. 2016, CIFAR
variant as in the seed report and kuangliu/pytorch-cifar): ResNet-18/34 (BasicBlock),
ResNet-50 (Bottleneck) and the pre-activation ResNet-18 (He et al., "Identity Mappings").

`width` is the stem's channels and, by default, the first stage's; `channels` sets the four
stages one by one (their default: width, 2 width, 4 width, 8 width). A Bottleneck stage
of `c` channels outputs 4c.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cifarlab.models.registry import kaiming_init, register


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand to 4x `channels`."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU before each convolution; the projection shortcut (a 1x1 convolution, no BN)
    takes the pre-activated input."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


Block = type[BasicBlock] | type[Bottleneck] | type[PreActBlock]


def stage_widths(width: int | None, channels: Sequence[int] | None) -> tuple[int, list[int]]:
    """(stem channels, the four stages' channels) from `width` and/or `channels`."""
    stem = width if width is not None else channels[0] if channels is not None else 64
    if channels is None:
        channels = [stem * 2**i for i in range(4)]
    if len(channels) != 4:
        raise ValueError(f"channels needs 4 stage widths, got {list(channels)}")
    return stem, list(channels)


def make_stages(
    block: Block, in_channels: int, channels: Sequence[int], blocks_per_stage: Sequence[int]
) -> tuple[list[nn.Sequential], int]:
    """The stages (first at stride 1, the others at stride 2) and their output channels."""
    stages = []
    for i, (width, n_blocks) in enumerate(zip(channels, blocks_per_stage, strict=True)):
        stride, blocks = 1 if i == 0 else 2, []
        for j in range(n_blocks):
            blocks.append(block(in_channels, width, stride if j == 0 else 1))
            in_channels = width * block.expansion
        stages.append(nn.Sequential(*blocks))
    return stages, in_channels


class ResNet(nn.Module):
    def __init__(
        self,
        blocks_per_stage: tuple[int, ...],
        num_classes: int = 10,
        width: int | None = None,
        channels: Sequence[int] | None = None,
        block: Block = BasicBlock,
    ) -> None:
        super().__init__()
        stem, channels = stage_widths(width, channels)
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)
        )
        stages, out_channels = make_stages(block, stem, channels, blocks_per_stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class PreActResNet(nn.Module):
    """The stem is a bare convolution (the first block pre-activates it); a last BN-ReLU
    before the pooling, as in He et al. (kuangliu/pytorch-cifar leaves that one out)."""

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...],
        num_classes: int = 10,
        width: int | None = None,
        channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        stem, channels = stage_widths(width, channels)
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False))
        stages, out_channels = make_stages(PreActBlock, stem, channels, blocks_per_stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(x))), 1))


def _width(width: int) -> dict[str, int]:
    return {"width": width}  # model.width is these models' own base width


@register(_width)
def resnet18(num_classes: int = 10, width: int | None = None,
             channels: Sequence[int] | None = None) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, width, channels)


@register(_width)
def resnet34(num_classes: int = 10, width: int | None = None,
             channels: Sequence[int] | None = None) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes, width, channels)


@register(_width)
def resnet50(num_classes: int = 10, width: int | None = None,
             channels: Sequence[int] | None = None) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes, width, channels, block=Bottleneck)


@register(_width)
def preact_resnet18(num_classes: int = 10, width: int | None = None,
                    channels: Sequence[int] | None = None) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes, width, channels)
