"""The training loader with the data set resident on the device: uint8 images stay there,
and each batch is gathered and augmented there (gpu_augment.BatchAugment).

It visits the images in exactly the order of the CPU loader (data/loader.py): the same
EpochBatchSampler shard per epoch, so both paths see the same images at each step, and DDP
ranks take the same disjoint shards. A batch's augmentation draws from a generator seeded
with (seed, epoch, step, rank), so a run resumed at any step reproduces the batches of an
uninterrupted run and nothing depends on the history of a random stream.

Alternating flips (data.augment.flip_mode "alternate"): each image gets one random bit from
the run's seed, and is mirrored in the epochs where that bit and the epoch's parity differ,
so every image is seen both ways in every two epochs (Jordan, 2024).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from cifarlab.config import AugmentConfig
from cifarlab.data.gpu_augment import BatchAugment
from cifarlab.data.loader import EpochBatchSampler, epoch_seed, train_sampler


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The augmentation seed of one batch (epoch_seed's mixing, applied twice more)."""
    return epoch_seed(epoch_seed(epoch_seed(seed, epoch), step), rank)


class ResidentLoader:
    """Both halves of the CPU path's (loader, sampler) pair: `set_epoch(epoch, start_step)`,
    then iterate `(x, y)` batches on the device (x normalised float32 (N, 3, H, W) in the
    device's layout: channels-last memory on CUDA, NCHW on the CPU; y int64); `len()` is
    the number of batches per epoch."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: BatchAugment,
        sampler: EpochBatchSampler,
        alternate_flip: bool = False,
    ) -> None:
        self.images, self.labels = images, labels  # (N, H, W, C) uint8, (N,) int64
        self.augment, self.sampler = augment, sampler
        self.generator = torch.Generator(device=images.device)
        self.flip_start = None  # alternating flips: each image's flip in odd epochs
        if alternate_flip:
            bits = torch.Generator().manual_seed(epoch_seed(sampler.seed, -1))
            self.flip_start = (torch.rand(len(labels), generator=bits) < 0.5).to(images.device)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields this epoch's batches from `start_step` on."""
        self.sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, batch_size = self.sampler.epoch, self.sampler.batch_size
        # One host-to-device copy per epoch; the steps then only launch device work.
        order = self.sampler.shard(epoch).to(self.images.device)
        for step in range(self.sampler.start_step, len(self)):
            index = order[step * batch_size : (step + 1) * batch_size]
            self.generator.manual_seed(batch_seed(self.sampler.seed, epoch, step,
                                                  self.sampler.rank))
            flip = None
            if self.flip_start is not None:
                flip = self.flip_start.index_select(0, index) ^ (epoch % 2 == 0)
            x = self.augment(self.images.index_select(0, index), self.generator, flip)
            yield x, self.labels.index_select(0, index)


def build_resident_loader(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    aug: AugmentConfig,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int,
    seed: int,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    compile_mode: str = "off",
) -> ResidentLoader:
    """A ResidentLoader over uint8 NHWC `images` copied to `device` (call `set_epoch` before
    iterating); it takes the place of both the loader and the sampler of
    loader.build_train_loader, with the same batches per epoch. `compile_mode`: torch.compile
    the augmentation (settings_rules.COMPILE_MODES)."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.int64)
    sampler = train_sampler(len(labels), batch_size, seed, rank=rank, world_size=world_size)
    return ResidentLoader(
        images.to(device), labels.to(device), BatchAugment(aug, mean, std, device, compile_mode),
        sampler, alternate_flip=aug.flip_mode == "alternate" and aug.hflip > 0,
    )
