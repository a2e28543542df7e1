"""The seed's augmentation chain with torchvision transforms, one image at a time in
DataLoader workers (see data/loader.py): the reference path. The automatic policies are
torchvision's own (TrivialAugmentWide, RandAugment, AutoAugment with its CIFAR-10 policy),
at the place data/policies.py takes them on the resident loader."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

from cifarlab.config import AugmentConfig
from cifarlab.devices import memory_format


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
        ops.append(v2.RandomCrop(32, padding=aug.crop_padding,
                                 padding_mode=aug.crop_padding_mode))
    if aug.translate > 0:
        ops.append(v2.RandomAffine(degrees=0, translate=(aug.translate, aug.translate)))
    if aug.policy == "trivialaugment":
        ops.append(v2.TrivialAugmentWide())
    elif aug.policy == "randaugment":
        ops.append(v2.RandAugment(aug.randaugment_n, aug.randaugment_m))
    elif aug.policy == "autoaugment":
        ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if aug.erase_p > 0:
        ops.append(v2.RandomErasing(aug.erase_p, scale=aug.erase_scale, ratio=aug.erase_ratio))
    if aug.cutout > 0:
        ops.append(Cutout(aug.cutout))
    return v2.Compose(ops)


class Cutout(torch.nn.Module):
    """Zero a `length` x `length` square at a uniformly random pixel, clipped at the edges
    (DeVries & Taylor, 2017; torchvision has no such transform: RandomErasing's rectangles
    always lie inside the image). Draws from the global generator, as torchvision does."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from cifarlab.data.policies import cutout

        h, w = image.shape[-2:]
        centre = torch.stack([torch.randint(0, h, ()), torch.randint(0, w, ())])
        return cutout(image[None], centre[None], self.length)[0]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NHWC batch -> float NCHW batch, normalised, in the device's layout
    (devices.memory_format: channels-last memory on CUDA, contiguous NCHW on the CPU)."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s).contiguous(memory_format=memory_format(x.device))
