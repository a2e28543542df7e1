import torch

from cifarlab.config import AugmentConfig
from cifarlab.data.cpu_augment import train_transform
from cifarlab.data.loader import AugmentedImages, EpochBatchSampler, build_train_loader

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def keys_to_indices(batches, n):
    return [k % n for batch in batches for k in batch]


def test_each_epoch_is_a_seeded_permutation():
    sampler = EpochBatchSampler(100, 32, seed=7)
    epochs = []
    for epoch in (1, 2, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert [len(b) for b in batches] == [32, 32, 32, 4] and len(sampler) == 4
        assert all(k // 100 == epoch for b in batches for k in b)
        epochs.append(keys_to_indices(batches, 100))
    assert sorted(epochs[0]) == list(range(100))
    assert epochs[0] == epochs[2] and epochs[0] != epochs[1]


def test_start_step_skips_batches_without_changing_the_rest():
    sampler = EpochBatchSampler(100, 32, seed=7)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start_step=2)
    assert list(sampler) == full[2:]


def test_ranks_take_disjoint_shards_that_cover_the_epoch():
    shards = []
    for rank in range(3):
        sampler = EpochBatchSampler(100, 8, seed=1, rank=rank, world_size=3)
        sampler.set_epoch(5)
        shards.append(keys_to_indices(list(sampler), 100))
        assert len(sampler) == 5  # 34 images per rank
    assert [len(s) for s in shards] == [34, 34, 34]
    # 102 positions: the 2 padding positions repeat images, all others are distinct.
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(100)) and len(flat) - len(set(flat)) == 2


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    images = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8)
    data = AugmentedImages(images, torch.arange(10), train_transform(AugmentConfig(), MEAN, STD),
                           seed=3)
    state = torch.get_rng_state()
    a = data[1 * 10 + 4][0]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    torch.manual_seed(123)
    assert torch.equal(data[14][0], a)  # same (epoch, index): same image, whatever came before
    assert not torch.equal(data[24][0], a)  # another epoch: other randomness
    other_seed = AugmentedImages(images, torch.arange(10), data.transform, seed=4)
    assert not torch.equal(other_seed[14][0], a)
    assert data[14][1] == 4


def test_batches_do_not_depend_on_the_number_of_workers():
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8)
    transform = train_transform(AugmentConfig(), MEAN, STD)
    results = []
    for workers in (0, 2):
        loader, sampler = build_train_loader(images, torch.arange(40), transform, batch_size=16,
                                             seed=0, workers=workers)
        sampler.set_epoch(2)
        results.append([x for x, _ in loader])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_a_last_batch_of_one_image_is_dropped():
    _, sampler = build_train_loader(torch.zeros(33, 32, 32, 3, dtype=torch.uint8),
                                    torch.zeros(33, dtype=torch.int64), lambda x: x,
                                    batch_size=16, seed=0, workers=0)
    sampler.set_epoch(1)
    assert [len(b) for b in sampler] == [16, 16]
