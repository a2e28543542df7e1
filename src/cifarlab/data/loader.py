"""The training loader: which images each step sees, and their augmentation randomness.

Both are pure functions of (seed, epoch, position), not of the history of a random
stream: the shuffled order of an epoch comes from a generator seeded with (seed, epoch),
and each image's augmentation from a generator seeded with (seed, epoch, image index).
So a run resumed at any step sees exactly the batches and augmentations that an
uninterrupted run sees, whatever the number of worker processes; and under DDP each
rank takes a disjoint shard of the same epoch order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cifarlab.interrupt import worker_signals

_PRIME = 1_000_003


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * _PRIME + epoch) % (1 << 63)


class EpochBatchSampler(Sampler[list[int]]):
    """Yields batches of keys `epoch * n + index` of one epoch's shuffled order.

    With `world_size` > 1 the order is padded (by repeating its start) to a multiple of
    `world_size` and rank `r` takes positions r, r + world_size, ...
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields this epoch's batches from `start_step` on."""
        self.epoch, self.start_step = epoch, start_step

    def shard(self, epoch: int) -> torch.Tensor:
        """This rank's image indices for `epoch`, in training order."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(self.n, generator=generator)
        total = math.ceil(self.n / self.world_size) * self.world_size
        order = torch.cat([order, order[: total - self.n]])
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        per_rank = math.ceil(self.n / self.world_size)
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        keys = self.shard(self.epoch) + self.epoch * self.n
        for step in range(self.start_step, len(self)):
            yield keys[step * self.batch_size : (step + 1) * self.batch_size].tolist()


class AugmentedImages(Dataset):
    """uint8 NHWC images read by key `epoch * n + index`; each passes through `transform`
    with the global torch RNG seeded from (seed, epoch, index), then restored."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Callable, seed: int
    ) -> None:
        self.images = images.permute(0, 3, 1, 2)  # CHW views, no copy
        self.labels = labels
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = divmod(key, len(self.labels))
        # torchvision's transforms draw from the global generator; reseeding it costs ~1 us.
        rng = torch.default_generator
        state = rng.get_state()
        rng.manual_seed((epoch_seed(self.seed, epoch) * _PRIME + index) % (1 << 63))
        try:
            return self.transform(self.images[index]), self.labels[index]
        finally:
            rng.set_state(state)


def train_sampler(
    n: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1
) -> EpochBatchSampler:
    """The training order of `n` images, for this rank."""
    # BatchNorm cannot train on a last batch of one image.
    per_rank = math.ceil(n / world_size)
    return EpochBatchSampler(n, batch_size, seed, rank=rank, world_size=world_size,
                             drop_last=per_rank % batch_size == 1)


def build_train_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    transform: Callable,
    *,
    batch_size: int,
    seed: int,
    workers: int,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, EpochBatchSampler]:
    """A DataLoader over uint8 NHWC `images` and its sampler (call `sampler.set_epoch`
    before iterating)."""
    sampler = train_sampler(len(labels), batch_size, seed, rank=rank, world_size=world_size)
    loader = DataLoader(
        AugmentedImages(images, labels, transform, seed),
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        worker_init_fn=worker_signals,
    )
    return loader, sampler
