"""A time-to-accuracy network for CIFAR: Jordan (2024), "94 % on CIFAR-10 in 3.29 seconds on
a single GPU" (arXiv 2404.00498), written from the paper's description.

- A 2x2 convolution at stride 1 without padding whose filters whiten the image's 2x2 patches:
  the eigenvectors of the training images' patch covariance, each scaled by the inverse
  square root of its eigenvalue, and their negatives (12 patch dimensions, 24 filters). It
  is frozen (the filters are set from data, `init_from_data`); its bias trains for the first
  epochs only (optim.whiten_bias_epochs), then GELU.
- Three groups of conv 3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv 3x3 -> BatchNorm ->
  GELU, at 64, 256 and 256 channels (scaled by model.width / 64), then a max-pool over the
  remaining 3x3 pixels and a linear classifier without bias whose output is multiplied by
  1/9 (a smaller output scale suits the large learning rate of the recipe).
- BatchNorm has its scale frozen at 1 (only the shift trains) and a fast-moving running
  average (momentum 0.4: the statistics follow the weights, which change quickly), with a
  tiny eps.
- Every 3x3 convolution starts with its first `in_channels` filters set to the identity
  (Dirac), the rest as PyTorch's default: at initialisation the network passes its input
  on, which the paper measured to shorten training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import UserError
from cifarlab.models.registry import register, scaled

CHANNELS = (64, 256, 256)
PATCH = 2  # side of the whitened patches
WHITEN_CHANNELS = 2 * 3 * PATCH * PATCH  # the eigenvectors and their negatives
HEAD_SCALE = 1 / 9
WHITEN_EPS = 5e-4  # added to the eigenvalues: patch directions with no variance stay bounded
WHITEN_IMAGES = 5000  # training images the patch covariance is measured on


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1: only the shift is a trained parameter. Its signature
    is nn.BatchNorm2d's, so a pruned model's layers rebuild as this class."""

    def __init__(self, num_features: int, eps: float = 1e-12, momentum: float = 0.4,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.weight.requires_grad_(False)


class ConvGroup(nn.Module):
    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = FrozenScaleBatchNorm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = FrozenScaleBatchNorm(channels)
        for conv in (self.conv1, self.conv2):
            identity = min(conv.in_channels, conv.out_channels)
            nn.init.dirac_(conv.weight.data[:identity])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.bn1(self.pool(self.conv1(x))))
        return F.gelu(self.bn2(self.conv2(x)))


class AirbenchNet(nn.Module):
    def __init__(self, num_classes: int = 10, channels: Sequence[int] = CHANNELS) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"channels needs 3 group widths, got {list(channels)}")
        if channels[0] < WHITEN_CHANNELS:
            # The first group's identity filters pass every whitened channel on.
            raise UserError(
                f"airbench's first group has {channels[0]} channels, fewer than the "
                f"{WHITEN_CHANNELS} of its whitening layer; use --set model.width=24 or more")
        self.whiten = nn.Conv2d(3, WHITEN_CHANNELS, PATCH, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        groups, in_channels = [], WHITEN_CHANNELS
        for width in channels:
            groups.append(ConvGroup(in_channels, width))
            in_channels = width
        self.layer1, self.layer2, self.layer3 = groups
        self.pool = nn.MaxPool2d(3)
        self.fc = nn.Linear(in_channels, num_classes, bias=False)

    @torch.no_grad()
    def init_from_data(self, images: np.ndarray, mean: Sequence[float],
                       std: Sequence[float]) -> None:
        """Set the whitening filters from the first WHITEN_IMAGES training images (uint8
        NHWC), normalised as the network sees them."""
        m, s = (torch.tensor(list(v), dtype=torch.float64).view(1, 3, 1, 1) for v in (mean, std))
        dims = 3 * PATCH * PATCH
        total = torch.zeros(dims, dtype=torch.float64)
        products = torch.zeros(dims, dims, dtype=torch.float64)
        count = 0
        for start in range(0, min(len(images), WHITEN_IMAGES), 500):  # bounded memory
            chunk = torch.from_numpy(images[start : start + 500]).permute(0, 3, 1, 2)
            x = (chunk.double() / 255 - m) / s
            patches = x.unfold(2, PATCH, 1).unfold(3, PATCH, 1)  # N, C, H', W', p, p
            patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, dims)
            total += patches.sum(0)
            products += patches.T @ patches
            count += len(patches)
        mean_patch = total / count
        covariance = products / count - torch.outer(mean_patch, mean_patch)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors / (eigenvalues + WHITEN_EPS).sqrt()).T  # one per row
        filters = filters.reshape(-1, 3, PATCH, PATCH)
        weight = torch.cat([filters, -filters]).to(self.whiten.weight)
        self.whiten.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1)) * HEAD_SCALE


def _width(width: int) -> dict[str, list[int]]:
    return {"channels": scaled(CHANNELS, width)}


@register(_width)
def airbench(num_classes: int = 10, channels: Sequence[int] = CHANNELS) -> AirbenchNet:
    return AirbenchNet(num_classes, channels)
