"""The seed's augmentation chain with torchvision transforms, one image at a time in
DataLoader workers (see data/loader.py): the reference path."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

from cifarlab.config import AugmentConfig


def train_transform(
    aug: AugmentConfig, mean: Sequence[float], std: Sequence[float]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 CHW image -> augmented, normalised float image, in the seed's order."""
    ops: list[Callable] = []
    if aug.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.rotate_degrees > 0:
        ops.append(v2.RandomRotation(aug.rotate_degrees))
    if max(aug.brightness, aug.contrast, aug.saturation, aug.hue) > 0:
        ops.append(v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
    if aug.crop_padding > 0:
        ops.append(v2.RandomCrop(32, padding=aug.crop_padding))
    if aug.translate > 0:
        ops.append(v2.RandomAffine(degrees=0, translate=(aug.translate, aug.translate)))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if aug.erase_p > 0:
        ops.append(v2.RandomErasing(aug.erase_p, scale=aug.erase_scale, ratio=aug.erase_ratio))
    return v2.Compose(ops)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NHWC batch -> float NCHW batch, normalised. On CUDA the memory stays
    channels-last; on the CPU it is made contiguous NCHW, the layout oneDNN's convolutions
    are reliable with (channels-last input corrupts weight gradients of 1x1 stride-2
    convolutions with few input channels)."""
    x = images.permute(0, 3, 1, 2).float()
    x = (x if x.is_cuda else x.contiguous()).div_(255)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)
