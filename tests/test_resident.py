import pytest
import torch

from cifarlab.config import AugmentConfig
from cifarlab.data.cpu_augment import train_transform
from cifarlab.data.loader import build_train_loader
from cifarlab.data.resident import build_resident_loader

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (100, 32, 32, 3), dtype=torch.uint8, generator=g)
    return images, torch.arange(100) % 10


def resident(data, aug=None, **kwargs):
    settings = {"batch_size": 16, "seed": 3, "device": "cpu"} | kwargs
    return build_resident_loader(*data, aug or AugmentConfig(), MEAN, STD, **settings)


def test_same_batches_as_the_cpu_loader(data):
    """Without augmentation both paths give the same tensors at every step."""
    images, labels = data
    cpu_loader, sampler = build_train_loader(
        images, labels, train_transform(AugmentConfig.off(), MEAN, STD), batch_size=16,
        seed=3, workers=0)
    loader = resident(data, AugmentConfig.off())
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == len(cpu_loader) == 7
        for (x, y), (x_cpu, y_cpu) in zip(batches, cpu_loader, strict=True):
            assert torch.equal(y, y_cpu)
            assert torch.equal(x, x_cpu)


def test_batches_are_on_the_device_normalised_and_nchw_on_the_cpu(data):
    loader = resident(data)
    loader.set_epoch(1)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    # Contiguous NCHW: channels-last batches reach a faulty oneDNN kernel (devices.memory_format).
    assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and x.device == y.device == torch.device("cpu")


def test_resuming_at_a_step_reproduces_the_rest_of_the_epoch(data):
    images, labels = data
    data = images[:40], labels[:40]
    loader = resident(data, batch_size=8)
    loader.set_epoch(4)
    full = list(loader)
    loader.set_epoch(2)
    list(loader)  # another epoch in between changes nothing
    loader.set_epoch(4, start_step=3)
    rest = list(loader)
    assert len(rest) == len(full) - 3
    for (x, y), (x_full, y_full) in zip(rest, full[3:], strict=True):
        assert torch.equal(x, x_full) and torch.equal(y, y_full)
    fresh = resident(data, batch_size=8)
    fresh.set_epoch(4, start_step=3)
    assert torch.equal(next(iter(fresh))[0], full[3][0])


def test_augmentation_differs_between_epochs_steps_and_seeds(data):
    images, labels = data
    one = images[:1].expand(32, -1, -1, -1).contiguous()  # one image, 32 times
    loader = resident((one, labels[:32]))
    loader.set_epoch(1)
    first, second = [x for x, _ in loader]
    loader.set_epoch(2)
    assert not torch.equal(first, second)
    assert not torch.equal(first, next(iter(loader))[0])
    other = resident((one, labels[:32]), seed=4)
    other.set_epoch(1)
    assert not torch.equal(first, next(iter(other))[0])


def test_ranks_take_disjoint_shards_with_their_own_randomness(data):
    images, labels = data
    seen = []
    for rank in range(3):
        loader = resident((images, torch.arange(100)), AugmentConfig.off(), batch_size=8,
                          rank=rank, world_size=3)
        loader.set_epoch(5)
        seen.append(torch.cat([y for _, y in loader]).tolist())
        assert len(loader) == 5  # 34 images per rank
    flat = [i for s in seen for i in s]
    assert set(flat) == set(range(100)) and len(flat) - len(set(flat)) == 2
    one = images[:1].expand(32, -1, -1, -1).contiguous()
    augmented = []
    for rank in range(2):
        loader = resident((one, labels[:32]), rank=rank, world_size=2)
        loader.set_epoch(1)
        augmented.append(next(iter(loader))[0])
    assert not torch.equal(*augmented)


def test_a_last_batch_of_one_image_is_dropped():
    data = torch.zeros(33, 32, 32, 3, dtype=torch.uint8), torch.zeros(33, dtype=torch.int64)
    loader = resident(data)
    loader.set_epoch(1)
    assert len(loader) == 2 and [len(y) for _, y in loader] == [16, 16]
