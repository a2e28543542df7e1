"""The per-image policies against torchvision: each op, for fixed magnitudes and signs, gives
what torchvision's functional op gives on each image (exactly, on the CPU), the magnitude bins
are torchvision's, and the drawn ops, bins and signs are independent per image and cover every
op with the policy's probabilities."""

import math
from collections import Counter

import pytest
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from cifarlab.config import AugmentConfig
from cifarlab.data import policies as P
from cifarlab.data.cpu_augment import Cutout, train_transform
from cifarlab.data.gpu_augment import BatchAugment

NEAREST = InterpolationMode.NEAREST
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """uint8 (8, 3, 32, 32): smooth images, noise, a low-contrast image (autocontrast and
    equalize have work to do), and flat images (their corner cases)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 256, (3, 3, 6, 6), generator=g).float()
    smooth = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear").round()
    noise = torch.randint(0, 256, (2, 3, 32, 32), generator=g).float()
    dull = 100 + smooth[:1] * 0.2
    almost_flat = torch.full((1, 3, 32, 32), 77.0)
    almost_flat[0, :, 0, :5] = 200  # one value but for 5 pixels: equalize leaves it
    flat = torch.full((1, 3, 32, 32), 255.0)
    return torch.cat([smooth, noise, dull.round(), almost_flat, flat]).to(torch.uint8)


def torchvision_op(image: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """What torchvision's policies' `_apply_op` does with one uint8 image (fill None)."""
    if name == "Identity":
        return image
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                         shear=[shear, 0.0] if name == "ShearX" else [0.0, shear],
                         interpolation=NEAREST, fill=None, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        t = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return TF.affine(image, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0],
                         interpolation=NEAREST, fill=None)
    if name == "Rotate":
        return TF.rotate(image, angle=magnitude, interpolation=NEAREST, fill=None)
    simple = {"Brightness": TF.adjust_brightness, "Color": TF.adjust_saturation,
              "Contrast": TF.adjust_contrast, "Sharpness": TF.adjust_sharpness}
    if name in simple:
        return simple[name](image, 1.0 + magnitude)
    if name == "Posterize":
        return TF.posterize(image, int(magnitude))
    if name == "Solarize":
        return TF.solarize(image, 255.0 * magnitude)
    return {"AutoContrast": TF.autocontrast, "Equalize": TF.equalize,
            "Invert": TF.invert}[name](image)


def all_magnitudes(op: int) -> list[float]:
    """Every magnitude of `op` in the three policies' bins, with both signs if signed."""
    values = set()
    for policy in P.POLICIES[1:]:
        values.update(P.magnitudes(policy, (32, 32))[op].tolist())
    if op in P.SIGNED:
        values.update([-v for v in values])
    return sorted(values)


@pytest.mark.parametrize("name", P.OPS)
def test_each_op_matches_torchvision_per_image(images, name):
    op = P.OPS.index(name)
    mags = all_magnitudes(op)
    # One batch holds every (image, magnitude) pair: each image its own magnitude.
    batch = images.repeat(len(mags), 1, 1, 1)
    magnitude = torch.tensor(mags).repeat_interleave(len(images))
    ours = P.apply_op(batch.float(), torch.full((len(batch),), op), magnitude)
    theirs = torch.stack([torchvision_op(im, name, m) for im, m in
                          zip(batch, magnitude.tolist(), strict=True)])
    differ = (ours != theirs.float()).flatten(1).any(1)
    assert not differ.any(), f"{name}: magnitudes {sorted(set(magnitude[differ].tolist()))}"
    assert ours.dtype == torch.float32


def test_mixed_ops_in_one_batch_match_torchvision(images):
    """Every image its own op: the selection among the ops' results picks the right one."""
    n = 4 * len(P.OPS)
    batch = images.repeat(n // len(images) + 1, 1, 1, 1)[:n]
    op = torch.arange(n) % len(P.OPS)
    table = P.magnitudes("trivialaugment", (32, 32))
    magnitude = table[op, torch.arange(n) % P.NUM_BINS] * torch.where(torch.arange(n) % 3 == 0,
                                                                       -1.0, 1.0)
    ours = P.apply_op(batch.float(), op, magnitude)
    theirs = torch.stack([torchvision_op(im, P.OPS[o], m) for im, o, m in
                          zip(batch, op.tolist(), magnitude.tolist(), strict=True)])
    assert torch.equal(ours, theirs.float())


@pytest.mark.parametrize("policy, transform", [
    ("trivialaugment", v2.TrivialAugmentWide),
    ("randaugment", v2.RandAugment),
    ("autoaugment", v2.AutoAugment),
])
def test_magnitude_bins_are_torchvisions(policy, transform):
    space = transform._AUGMENTATION_SPACE
    bins = P.AUTOAUGMENT_BINS if policy == "autoaugment" else P.NUM_BINS
    table = P.magnitudes(policy, (32, 24))
    for name, (values, signed) in space.items():
        op = P.OPS.index(name)
        expected = values(bins, 32, 24)
        if expected is None:
            assert (table[op] == 0).all()
        else:
            assert torch.equal(table[op], expected.float()), name
        assert (op in P.SIGNED) == signed, name
    if policy != "autoaugment":
        assert list(space) == list(P.OPS[:P.SEARCHED_OPS])


def test_autoaugment_cifar10_policy_is_torchvisions():
    theirs = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies
    assert [tuple(map(tuple, pair)) for pair in theirs] == list(P.AUTOAUGMENT_CIFAR10)


# --- draws ---------------------------------------------------------------------------------

def draw(policy: str, n: int, seed: int = 0, **kwargs) -> P.PolicyParams:
    return P.Policy(policy, **kwargs).draw(n, (32, 32), torch.Generator().manual_seed(seed))


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's chi-squared below its 0.9999 quantile (Wilson-Hilferty approximation)."""
    expected = probs * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    k = len(counts) - 1
    quantile = k * (1 - 2 / (9 * k) + 3.719 * math.sqrt(2 / (9 * k))) ** 3
    return stat < quantile


def test_trivialaugment_draws_op_bin_and_sign_per_image():
    n = 28_000
    p = draw("trivialaugment", n)
    assert p.ops.shape == (1, n)
    ops = p.ops[0]
    assert chi2_ok(torch.bincount(ops, minlength=14).float(), torch.full((14,), 1 / 14))
    table = P.magnitudes("trivialaugment", (32, 32))
    # The bin is uniform over 31 and independent of the op: read it back from the magnitude.
    rot = ops == P.ROTATE
    bins = torch.bucketize(p.magnitudes[0][rot].abs(), table[P.ROTATE])
    assert chi2_ok(torch.bincount(bins, minlength=31).float(), torch.full((31,), 1 / 31))
    # Signs: half negative for signed ops, never for the others.
    signed = torch.tensor([int(o) in P.SIGNED for o in ops])
    negative = p.magnitudes[0] < 0
    assert abs(negative[signed & (p.magnitudes[0] != 0)].float().mean() - 0.5) < 0.02
    assert not negative[~signed].any()
    # Independent per image: neighbours agree on the op 1 time in 14, as chance has it.
    same = (ops[1:] == ops[:-1]).float().mean()
    assert abs(same - 1 / 14) < 0.01
    # Joint (op of image i, op of image i + 1) is uniform over 14 x 14.
    pairs = torch.bincount(ops[:-1:2] * 14 + ops[1::2], minlength=196).float()
    assert chi2_ok(pairs, torch.full((196,), 1 / 196))


def test_randaugment_draws_n_independent_stages_at_magnitude_m():
    n = 14_000
    p = draw("randaugment", n, num_ops=3, magnitude=20)
    assert p.ops.shape == (3, n)
    table = P.magnitudes("randaugment", (32, 32))
    for s in range(3):
        assert chi2_ok(torch.bincount(p.ops[s], minlength=14).float(), torch.full((14,), 1 / 14))
        assert torch.equal(p.magnitudes[s].abs(), table[p.ops[s], 20])
    pairs = torch.bincount(p.ops[0] * 14 + p.ops[1], minlength=196).float()
    assert chi2_ok(pairs, torch.full((196,), 1 / 196))


def test_autoaugment_draws_sub_policies_and_their_probabilities():
    n = 50_000
    p = draw("autoaugment", n)
    table = P.magnitudes("autoaugment", (32, 32))
    # Each image's pair of ops belongs to one sub-policy (or is skipped, as Identity).
    counts = Counter()
    for a, b in zip(p.ops[0].tolist(), p.ops[1].tolist(), strict=True):
        counts[a, b] += 1
    expected = Counter()
    for first, second in P.AUTOAUGMENT_CIFAR10:
        o1, o2 = P.OPS.index(first[0]), P.OPS.index(second[0])
        for keep1 in (True, False):
            for keep2 in (True, False):
                prob = ((first[1] if keep1 else 1 - first[1])
                        * (second[1] if keep2 else 1 - second[1]) / 25)
                expected[(o1 if keep1 else 0), (o2 if keep2 else 0)] += prob
    assert set(counts) <= {k for k, v in expected.items() if v > 0}
    keys = [k for k, v in expected.items() if v * n > 20]
    got = torch.tensor([float(counts[k]) for k in keys])
    probs = torch.tensor([expected[k] for k in keys])
    assert chi2_ok(got, probs / probs.sum())
    # Magnitudes are the bins the sub-policies name.
    rotate = p.ops[0] == P.ROTATE
    assert torch.equal(p.magnitudes[0][rotate].abs().unique(), table[P.ROTATE, 2:3])


def test_draws_are_a_function_of_the_generator():
    a, b, c = draw("trivialaugment", 64, 1), draw("trivialaugment", 64, 1), draw(
        "trivialaugment", 64, 2)
    assert torch.equal(a.ops, b.ops) and torch.equal(a.magnitudes, b.magnitudes)
    assert not torch.equal(a.ops, c.ops)


# --- in the chain ----------------------------------------------------------------------------

def seed_params(params) -> list[torch.Tensor]:
    j = params.jitter
    return [params.flip, params.angle, j.order, j.factors, j.hue, params.crop,
            params.translate, params.erase]


def test_policies_leave_the_seed_chains_draws_alone():
    """The seed's draws come first and are the same with a policy and Cutout on; with the
    policy settings at their defaults, they are what they always were."""
    g = torch.Generator().manual_seed(123)
    off = BatchAugment(AugmentConfig(), MEAN, STD).draw(64, (32, 32), g)
    assert off.policy is None and off.cutout is None
    # Recorded before the policies existed.
    assert [off.flip.sum().item(), off.crop.sum().item(), off.translate.abs().sum().item(),
            off.erase.sum().item()] == [24, 513, 227, 2557]
    assert off.angle.double().sum().item() == pytest.approx(-16.71426010131836, abs=1e-9)
    assert torch.rand(1, generator=g).item() == pytest.approx(0.9788658022880554, abs=1e-12)
    aug = AugmentConfig(policy="randaugment", cutout=8)
    on = BatchAugment(aug, MEAN, STD).draw(64, (32, 32), torch.Generator().manual_seed(123))
    for a, b in zip(seed_params(off), seed_params(on), strict=True):
        assert torch.equal(a, b)
    assert on.policy.ops.shape == (2, 64) and on.cutout.shape == (64, 2)


def test_chain_places_the_policy_after_crop_and_cutout_after_normalisation(images):
    aug = AugmentConfig(hflip=0.5, rotate_degrees=0.0, brightness=0.0, contrast=0.0,
                        saturation=0.0, hue=0.0, crop_padding=4, translate=0.0, erase_p=0.0,
                        policy="trivialaugment", cutout=12)
    augment = BatchAugment(aug, MEAN, STD)
    batch = images.repeat(4, 1, 1, 1)
    params = augment.draw(len(batch), (32, 32), torch.Generator().manual_seed(3))
    ours = augment.apply(batch.permute(0, 2, 3, 1), params)
    for i, im in enumerate(batch):
        x = TF.horizontal_flip(im) if params.flip[i] else im
        top, left = params.crop[i].tolist()
        x = TF.crop(TF.pad(x, [4]), top, left, 32, 32)
        x = torchvision_op(x, P.OPS[params.policy.ops[0, i]],
                           params.policy.magnitudes[0, i].item())
        x = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), MEAN, STD)
        x = P.cutout(x[None], params.cutout[i:i + 1], 12)[0]
        assert torch.equal(ours[i], x), i


def test_cutout_squares_are_clipped_at_the_edges():
    x = torch.ones(3, 1, 8, 8)
    out = P.cutout(x, torch.tensor([[0, 0], [4, 4], [7, 2]]), 4)
    assert int((out[0] == 0).sum()) == 2 * 2  # rows -2..1 and columns -2..1, clipped
    assert torch.equal((out[1, 0] == 0).nonzero().amin(0), torch.tensor([2, 2]))
    assert int((out[1] == 0).sum()) == 16
    assert int((out[2] == 0).sum()) == 3 * 4  # rows 5..8 clipped to 5..7
    odd = P.cutout(torch.ones(1, 1, 9, 9), torch.tensor([[4, 4]]), 5)
    assert torch.equal((odd[0, 0] == 0).nonzero().amin(0), torch.tensor([2, 2]))
    assert int((odd == 0).sum()) == 25  # centred on the pixel for odd sizes


def test_cutout_centres_are_uniform():
    centres = P.draw_cutout(32_000, (32, 32), torch.Generator().manual_seed(0))
    for axis in range(2):
        assert chi2_ok(torch.bincount(centres[:, axis], minlength=32).float(),
                       torch.full((32,), 1 / 32))


def test_cpu_cutout_transform_draws_from_the_global_generator():
    torch.manual_seed(5)
    out = Cutout(6)(torch.ones(3, 32, 32))
    torch.manual_seed(5)
    centre = torch.stack([torch.randint(0, 32, ()), torch.randint(0, 32, ())])
    assert torch.equal(out, P.cutout(torch.ones(1, 3, 32, 32), centre[None], 6)[0])
    assert 0 < int((out == 0).sum()) <= 3 * 36


@pytest.mark.parametrize("policy, kind", [
    ("trivialaugment", v2.TrivialAugmentWide), ("randaugment", v2.RandAugment),
    ("autoaugment", v2.AutoAugment)])
def test_torchvision_loader_gets_the_same_policy_from_torchvision(policy, kind):
    aug = AugmentConfig.off()
    aug.policy, aug.randaugment_n, aug.randaugment_m, aug.cutout = policy, 3, 12, 10
    ops = train_transform(aug, MEAN, STD).transforms
    names = [type(t).__name__ for t in ops]
    assert names == [kind.__name__, "ToDtype", "Normalize", "Cutout"]
    if policy == "randaugment":
        assert (ops[0].num_ops, ops[0].magnitude) == (3, 12)
    if policy == "autoaugment":
        assert ops[0].policy == v2.AutoAugmentPolicy.CIFAR10


@pytest.mark.parametrize("policy", P.POLICIES[1:])
def test_output_statistics_match_torchvisions_policy(images, policy):
    """Per-image statistics of whole augmented batches: the batched policy and torchvision's
    (one image at a time) draw from the same distribution."""
    aug = AugmentConfig.off()
    aug.policy = policy
    batch = images[:5].repeat(80, 1, 1, 1)
    ours = BatchAugment(aug, MEAN, STD)(batch, torch.Generator().manual_seed(4))
    torch.manual_seed(4)
    transform = train_transform(aug, MEAN, STD)
    theirs = torch.stack([transform(im) for im in batch])
    for stat in (lambda x: x.mean((1, 2, 3)), lambda x: x.std((1, 2, 3))):
        a, b = stat(ours).sort().values, stat(theirs).sort().values
        grid = torch.cat([a, b])
        cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
        cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
        assert (cdf_a - cdf_b).abs().max() < 1.95 * math.sqrt(2 / len(a))  # KS, alpha 0.001


@pytest.mark.parametrize("policy", P.POLICIES[1:])
def test_policies_have_no_syncing_or_data_dependent_ops(images, policy):
    """Under the dispatch mode that records every op after which a GPU's host would wait."""
    from test_step import SyncOps

    augment = BatchAugment(AugmentConfig(policy=policy, cutout=8), MEAN, STD)
    with SyncOps() as mode:
        augment(images, torch.Generator().manual_seed(0))
    assert mode.seen == []


def test_policies_never_read_tensor_values_on_the_host(images, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)
    for policy in P.POLICIES[1:]:
        aug = AugmentConfig(policy=policy, cutout=8)
        BatchAugment(aug, MEAN, STD)(images, torch.Generator().manual_seed(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_policies_never_synchronise(images):
    for policy in P.POLICIES[1:]:
        augment = BatchAugment(AugmentConfig(policy=policy, cutout=8), MEAN, STD, "cuda")
        x, generator = images.cuda(), torch.Generator("cuda").manual_seed(0)
        augment(x, generator)  # first call: allocations and lazy initialisation
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            augment(x, generator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
