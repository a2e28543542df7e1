"""training/mixing.py: mixup, CutMix, soft targets with label smoothing, dominant labels."""

import numpy as np
import pytest
import torch
from torch import nn

from cifarlab.config import MixConfig
from cifarlab.training.mixing import (
    Mixer,
    SoftTargetCrossEntropy,
    build_mixer,
    cutmix_box,
    soft_targets,
)


def batch(n=6, classes=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % classes


def test_soft_targets_smooth_the_one_hot_labels():
    t = soft_targets(torch.tensor([2, 0]), classes=4, smoothing=0.2)
    assert torch.allclose(t[0], torch.tensor([0.05, 0.05, 0.85, 0.05]))
    assert torch.allclose(t.sum(1), torch.ones(2))


def test_soft_target_loss_is_cross_entropy_with_label_smoothing():
    logits, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    ours = SoftTargetCrossEntropy()(logits, soft_targets(labels, 4, 0.1))
    assert ours == pytest.approx(nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels).item())


def test_smoothing_then_mixing_is_mixing_then_smoothing():
    logits, labels = torch.randn(6, 4), torch.arange(6) % 4
    mixer = Mixer(MixConfig(mixup_alpha=1.0), classes=4, label_smoothing=0.1, seed=3)
    _, targets, _ = mixer(torch.zeros(6, 3, 8, 8), labels, epoch=1, step=0)
    lam = mixer.draw(1, 0, 8, 8).lam
    mixed_hard = lam * soft_targets(labels, 4, 0) + (1 - lam) * soft_targets(labels.flip(0), 4, 0)
    torch_loss = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, mixed_hard)
    assert SoftTargetCrossEntropy()(logits, targets) == pytest.approx(torch_loss.item())


def test_draws_are_a_pure_function_of_seed_epoch_step_and_rank():
    mixer = Mixer(MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0), 10, 0.0, seed=7)
    draws = [mixer.draw(2, s, 32, 32) for s in range(20)]
    assert draws == [mixer.draw(2, s, 32, 32) for s in range(20)]  # e.g. after a resume
    assert len({d.lam for d in draws}) == 20
    assert draws != [mixer.draw(3, s, 32, 32) for s in range(20)]
    assert draws != [Mixer(mixer.mix, 10, 0.0, seed=7, rank=1).draw(2, s, 32, 32)
                     for s in range(20)]
    assert {d.box is None for d in draws} == {True, False}  # both kinds at switch_prob 0.5


def test_mixup_mixes_images_and_targets_with_the_reversed_batch():
    x, y = batch()
    mixer = Mixer(MixConfig(mixup_alpha=1.0), 4, 0.0, seed=1)
    lam = mixer.draw(1, 3, 8, 8).lam
    mixed, targets, labels = mixer(x, y, epoch=1, step=3)
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0))
    assert targets[0, y[0]].item() == pytest.approx(lam + (1 - lam) * float(y[-1] == y[0]))
    assert torch.equal(labels, y if lam >= 0.5 else y.flip(0))


def test_dominant_label_is_the_one_with_the_larger_weight():
    x, y = batch()
    mixer = Mixer(MixConfig(mixup_alpha=1.0), 4, 0.0, seed=1)
    kinds = set()
    for step in range(30):
        lam = mixer.draw(1, step, 8, 8).lam
        _, targets, labels = mixer(x, y, 1, step)
        assert torch.equal(labels, y if lam >= 0.5 else y.flip(0))
        assert torch.equal(labels, targets.argmax(1)) or lam == 0.5
        kinds.add(lam >= 0.5)
    assert kinds == {True, False}


def test_cutmix_pastes_a_box_and_corrects_lambda_by_its_clipped_area():
    x, y = batch()
    mixer = Mixer(MixConfig(cutmix_alpha=1.0), 4, 0.0, seed=2)
    for step in range(10):
        draw = mixer.draw(1, step, 8, 8)
        mixed, targets, _ = mixer(x, y, 1, step)
        if draw.lam == 1.0:  # a box clipped to nothing: the batch as it is
            assert torch.equal(mixed, x)
            continue
        top, bottom, left, right = draw.box
        inside = torch.zeros(8, 8, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(mixed[..., inside], x.flip(0)[..., inside])
        assert torch.equal(mixed[..., ~inside], x[..., ~inside])
        assert draw.lam == pytest.approx(1 - inside.sum().item() / 64)
        expected = draw.lam * soft_targets(y, 4, 0) + (1 - draw.lam) * soft_targets(y.flip(0),
                                                                                      4, 0)
        assert torch.allclose(targets, expected)


class Corner:
    """A generator whose box centre is the top-left pixel."""

    def integers(self, high):
        return 0


def test_cutmix_box_is_clipped_at_the_border():
    # lam 0.75: a 16x16 box of a 32x32 image; centred at (0, 0) only its 8x8 quarter is left
    assert cutmix_box(0.75, 32, 32, Corner()) == (0, 8, 0, 8)
    top, bottom, left, right = cutmix_box(0.75, 32, 32, np.random.default_rng(0))
    assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
    assert bottom - top <= 16 and right - left <= 16


def test_switch_probability_and_probability():
    both = MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0)
    assert all(Mixer(both, 4, 0, 0).draw(1, s, 32, 32).box is not None for s in range(10))
    both.switch_prob = 0.0
    assert all(Mixer(both, 4, 0, 0).draw(1, s, 32, 32).box is None for s in range(10))
    half = MixConfig(mixup_alpha=1.0, prob=0.5)
    lams = [Mixer(half, 4, 0, 0).draw(1, s, 32, 32).lam for s in range(200)]
    assert 70 < sum(lam == 1.0 for lam in lams) < 130


def test_mixing_off_keeps_the_plain_label_smoothed_loss():
    mixer, loss = build_mixer(MixConfig(), 10, 0.1, seed=0, rank=0)
    assert mixer is None and isinstance(loss, nn.CrossEntropyLoss)
    assert loss.label_smoothing == 0.1
    mixer, _ = build_mixer(MixConfig(mixup_alpha=1.0, prob=0.0), 10, 0.1, seed=0, rank=0)
    assert mixer is None
    mixer, loss = build_mixer(MixConfig(cutmix_alpha=1.0), 10, 0.1, seed=0, rank=0)
    assert isinstance(mixer, Mixer) and isinstance(loss, SoftTargetCrossEntropy)
