import math

import pytest

from cifarlab.schedule import lr_factor

STEPS_PER_EPOCH = 176  # 45,000 images at batch 256
TOTAL, WARMUP = 100 * STEPS_PER_EPOCH, 5 * STEPS_PER_EPOCH


def test_warmup_rises_linearly_to_the_peak_after_five_epochs():
    assert lr_factor(0, TOTAL, WARMUP, "cosine") == pytest.approx(1 / WARMUP)
    assert lr_factor(WARMUP // 2 - 1, TOTAL, WARMUP, "cosine") == pytest.approx(0.5)
    assert lr_factor(WARMUP - 1, TOTAL, WARMUP, "cosine") == pytest.approx(1.0)
    assert lr_factor(WARMUP, TOTAL, WARMUP, "cosine") == pytest.approx(1.0)


def test_cosine_is_half_way_at_the_middle_of_the_annealing_and_zero_at_the_end():
    middle = WARMUP + (TOTAL - WARMUP) // 2
    assert lr_factor(middle, TOTAL, WARMUP, "cosine") == pytest.approx(0.5)
    epoch_50 = 50 * STEPS_PER_EPOCH
    expected = 0.5 * (1 + math.cos(math.pi * (epoch_50 - WARMUP) / (TOTAL - WARMUP)))
    assert lr_factor(epoch_50, TOTAL, WARMUP, "cosine") == pytest.approx(expected)
    assert lr_factor(TOTAL - 1, TOTAL, WARMUP, "cosine") < 1e-6
    assert lr_factor(TOTAL, TOTAL, WARMUP, "cosine") == 0.0


def test_cosine_decreases_monotonically_after_warmup():
    values = [lr_factor(s, TOTAL, WARMUP, "cosine") for s in range(WARMUP, TOTAL, 97)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_constant_and_no_warmup():
    assert lr_factor(0, TOTAL, 0, "constant") == 1.0
    assert lr_factor(TOTAL - 1, TOTAL, 0, "constant") == 1.0
    assert lr_factor(0, TOTAL, 0, "cosine") == 1.0
