"""DenseNet-BC (Huang et al. 2017) for 32x32 inputs, as kuangliu/pytorch-cifar: a 3x3 stem
of 2 x growth channels at stride 1, four dense blocks of bottleneck layers (BN-ReLU-1x1 to
4 x growth, BN-ReLU-3x3 to growth, concatenated to the input), transitions that halve the
channels (BN-ReLU-1x1, 2x2 average pooling), a last BN-ReLU, global pooling, the classifier.

`growth_rate` sets every layer's width (DenseNet-121: 32, blocks of 6, 12, 24, 16 layers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cifarlab.models.registry import kaiming_init, register, scaled


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
                         nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.AvgPool2d(2))


class DenseNet(nn.Module):
    def __init__(
        self,
        block_config: Sequence[int],
        growth_rate: int = 32,
        num_classes: int = 10,
        reduction: float = 0.5,
    ) -> None:
        super().__init__()
        channels = 2 * growth_rate
        self.stem = nn.Conv2d(3, channels, 3, 1, 1, bias=False)
        stages: list[nn.Module] = []
        for i, n_layers in enumerate(block_config):
            layers = []
            for _ in range(n_layers):
                layers.append(DenseLayer(channels, growth_rate))
                channels += growth_rate
            stages.append(nn.Sequential(*layers))
            if i < len(block_config) - 1:
                out_channels = int(channels * reduction)
                stages.append(Transition(channels, out_channels))
                channels = out_channels
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.features(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register(lambda width: {"growth_rate": scaled([32], width)[0]})
def densenet121(num_classes: int = 10, growth_rate: int = 32,
                block_config: Sequence[int] = (6, 12, 24, 16)) -> DenseNet:
    return DenseNet(block_config, growth_rate, num_classes)
