import torch
from torchvision.transforms import v2

from cifarlab.config import AugmentConfig
from cifarlab.data.cpu_augment import normalize, train_transform

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_seed_chain_has_the_seed_ops_in_order():
    ops = train_transform(AugmentConfig(), MEAN, STD).transforms
    assert [type(op) for op in ops] == [
        v2.RandomHorizontalFlip, v2.RandomRotation, v2.ColorJitter, v2.RandomCrop,
        v2.RandomAffine, v2.ToDtype, v2.Normalize, v2.RandomErasing]
    flip, rot, jitter, crop, affine, _, norm, erase = ops
    assert flip.p == 0.5 and list(rot.degrees) == [-15, 15]
    assert jitter.brightness == (0.7, 1.3) and jitter.contrast == (0.7, 1.3)
    assert jitter.saturation == (0.7, 1.3) and jitter.hue == (-0.1, 0.1)
    assert crop.size == (32, 32) and crop.padding == [4, 4, 4, 4]
    assert crop.padding_mode == "constant"
    torch.manual_seed(0)
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    crops = torch.stack([crop(white) for _ in range(50)])
    assert set(crops.unique().tolist()) == {0, 255}  # zero padding shows at the borders
    assert affine.degrees == [0.0, 0.0] and affine.translate == (0.1, 0.1)
    assert norm.mean == list(MEAN) and norm.std == list(STD)
    assert erase.p == 0.3 and erase.scale == (0.02, 0.33) and erase.ratio == (0.3, 3.3)


def test_without_augmentation_the_chain_only_normalises():
    transform = train_transform(AugmentConfig.off(), MEAN, STD)
    assert [type(op) for op in transform.transforms] == [v2.ToDtype, v2.Normalize]
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    expected = normalize(image.permute(1, 2, 0)[None], MEAN, STD)[0]
    assert torch.allclose(transform(image), expected, atol=1e-6)


def test_normalize_matches_the_formula():
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    out = normalize(images, MEAN, STD)
    assert out.shape == (4, 3, 32, 32)
    ref = (images.permute(0, 3, 1, 2).double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(out.double(), ref, atol=1e-5)
