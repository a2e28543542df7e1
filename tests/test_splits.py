import numpy as np
import pytest
import torch

from cifarlab.data.sources.images import ImageSet
from cifarlab.data.splits import (
    balanced_subset,
    channel_stats,
    check_same_classes,
    train_val_split,
)
from cifarlab.errors import UserError


def test_split_is_45k_5k_and_matches_random_split_with_seed_43():
    train, val = train_val_split(50_000, 0.1, 43)
    assert (len(train), len(val)) == (45_000, 5_000)
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(50_000))
    ref_train, ref_val = torch.utils.data.random_split(
        range(50_000), [45_000, 5_000], generator=torch.Generator().manual_seed(43))
    assert np.array_equal(train, ref_train.indices) and np.array_equal(val, ref_val.indices)


def test_split_is_deterministic_and_depends_on_the_seed():
    a, _ = train_val_split(1000, 0.1, 43)
    b, _ = train_val_split(1000, 0.1, 43)
    c, _ = train_val_split(1000, 0.1, 44)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_split_too_small_is_refused():
    with pytest.raises(UserError, match="val_fraction"):
        train_val_split(4, 0.1, 43)


def test_balanced_subset():
    labels = np.repeat(np.arange(10), 100)
    idx = balanced_subset(labels, 95, seed=1)
    assert len(idx) == 95 and len(np.unique(idx)) == 95
    counts = np.bincount(labels[idx], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert np.array_equal(idx, balanced_subset(labels, 95, seed=1))
    assert not np.array_equal(idx, balanced_subset(labels, 95, seed=2))


def test_balanced_subset_with_a_small_class():
    labels = np.array([0] * 3 + [1] * 50)
    idx = balanced_subset(labels, 20, seed=0)
    assert np.bincount(labels[idx]).tolist() == [3, 17]


def test_channel_stats_measured_per_channel():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 32, 32, 3), dtype=np.uint8)
    mean, std = channel_stats(images)
    pixels = images.reshape(-1, 3) / 255.0
    assert np.allclose(mean, pixels.mean(0)) and np.allclose(std, pixels.std(0))


def test_classes_must_match():
    a = ImageSet(np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, np.int64), ["cat", "dog"])
    b = ImageSet(a.images, a.labels, ["cat", "cow"])
    with pytest.raises(UserError, match=r"only in training: \['dog'\].*only in test: \['cow'\]"):
        check_same_classes(a, b)
