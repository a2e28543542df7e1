"""VGG with BatchNorm for 32x32 inputs (kuangliu/pytorch-cifar): 3x3 convolutions (with
bias, as torchvision's VGG) + BN + ReLU, a 2x2 max-pool after each of the five blocks, and a
single Linear(512, classes) on the 1x1 result in place of ImageNet's three-layer head.

`channels` sets every convolution's output channels (8 for VGG-11, 13 for VGG-16); the
pooling positions are fixed by the depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cifarlab.models.registry import kaiming_init, register, scaled

# Output channels of each block's convolutions; a max-pool follows each block.
VGG11_BLOCKS = ((64,), (128,), (256, 256), (512, 512), (512, 512))
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(nn.Module):
    def __init__(
        self,
        blocks: Sequence[Sequence[int]],
        num_classes: int = 10,
        channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        sizes = [len(b) for b in blocks]
        channels = list(channels) if channels is not None else [c for b in blocks for c in b]
        if len(channels) != sum(sizes):
            raise ValueError(f"channels needs {sum(sizes)} convolution widths, got {channels}")
        layers: list[nn.Module] = []
        in_channels, it = 3, iter(channels)
        for size in sizes:
            for _ in range(size):
                width = next(it)
                layers += [nn.Conv2d(in_channels, width, 3, 1, 1), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                in_channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # 1x1 already at 32x32: other sizes still work
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _width(blocks: Sequence[Sequence[int]]):
    return lambda width: {"channels": scaled([c for b in blocks for c in b], width)}


@register(_width(VGG11_BLOCKS))
def vgg11_bn(num_classes: int = 10, channels: Sequence[int] | None = None) -> VGG:
    return VGG(VGG11_BLOCKS, num_classes, channels)


@register(_width(VGG16_BLOCKS))
def vgg16_bn(num_classes: int = 10, channels: Sequence[int] | None = None) -> VGG:
    return VGG(VGG16_BLOCKS, num_classes, channels)
