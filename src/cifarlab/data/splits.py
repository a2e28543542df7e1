"""From a loaded source to the train / validation / test sets a run uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cifarlab.config import DataConfig
from cifarlab.data.sources import load_source
from cifarlab.data.sources.images import ImageSet
from cifarlab.errors import UserError


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    mean: tuple[float, float, float]  # per channel, measured on `train`, in [0, 1] units
    std: tuple[float, float, float]

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def subset(images: ImageSet, indices: np.ndarray) -> ImageSet:
    return ImageSet(images.images[indices], images.labels[indices], images.classes)


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of `n` images drawn at random, as evenly over the classes as they allow."""
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    # Round-robin over the shuffled classes: class counts differ by at most one where possible.
    chosen, rank = [], 0
    while len(chosen) < n:
        for members in by_class:
            if rank < len(members) and len(chosen) < n:
                chosen.append(members[rank])
        rank += 1
    return np.sort(np.asarray(chosen, dtype=np.int64))


def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The same split as `torch.utils.data.random_split(range(n), [n - v, v], generator)`
    with `generator.manual_seed(seed)`, which is how the seed report drew its 45k/5k split."""
    n_val = round(n * val_fraction)
    if not 1 <= n_val < n:
        empty = "validation" if n_val < 1 else "training"
        raise UserError(
            f"a validation fraction of {val_fraction} leaves no {empty} images out of {n}; "
            "change data.val_fraction or use more data"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return perm[: n - n_val], perm[n - n_val :]


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 NHWC images, in [0, 1] units."""
    pixels = images.reshape(-1, 3)
    total = np.zeros(3)
    total_sq = np.zeros(3)
    for start in range(0, len(pixels), 1 << 22):  # chunks keep float64 copies small
        chunk = pixels[start : start + (1 << 22)].astype(np.float64)
        total += chunk.sum(0)
        total_sq += (chunk * chunk).sum(0)
    mean = total / len(pixels)
    std = np.sqrt(np.maximum(total_sq / len(pixels) - mean**2, 0.0))
    return tuple(float(m) / 255 for m in mean), tuple(float(s) / 255 for s in std)


def check_same_classes(train: ImageSet, test: ImageSet) -> None:
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise UserError(
            f"training and test data have different classes (only in training: {only_train}, "
            f"only in test: {only_test}); give test data with the same class folders"
        )


def prepare_splits(config: DataConfig) -> Splits:
    source = load_source(config.source, config.root, resize=config.resize,
                         label_set=config.label_set)
    train = source.train
    if len(train.classes) < 2:
        found = f"one class ({train.classes[0]!r})" if train.classes else "no classes"
        raise UserError(f"--data {config.source}: {found}; a classifier needs images of at "
                        "least two classes (one folder each)")
    if config.test_source == "auto":
        test = source.test
    elif config.test_source == "none":
        test = None
    else:
        other = load_source(config.test_source, config.root, resize=config.resize,
                            label_set=config.label_set)
        test = other.test if other.test is not None else other.train
    if test is not None:
        check_same_classes(train, test)
    if config.limit is not None:
        if config.limit > len(train.labels):
            raise UserError(
                f"data.limit={config.limit} is more than the {len(train.labels)} training images"
                " there are; lower --limit"
            )
        train = subset(train, balanced_subset(train.labels, config.limit, config.split_seed))
    train_idx, val_idx = train_val_split(len(train.labels), config.val_fraction, config.split_seed)
    train, val = subset(train, train_idx), subset(train, val_idx)
    mean, std = channel_stats(train.images)
    return Splits(train, val, test, mean, std)
