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


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "multistep", "constant"])
def test_every_schedule_warms_up_alike(schedule):
    assert lr_factor(0, TOTAL, WARMUP, schedule, (0.5,)) == pytest.approx(1 / WARMUP)
    assert lr_factor(WARMUP - 1, TOTAL, WARMUP, schedule, (0.5,)) == pytest.approx(1.0)
    assert lr_factor(WARMUP, TOTAL, WARMUP, schedule, (0.5,)) == pytest.approx(1.0)


def test_onecycle_falls_linearly_to_zero_after_the_warmup():
    # 100 steps, 20 of warm-up: 80 steps down, 1/80 per step.
    assert lr_factor(20, 100, 20, "onecycle") == 1.0
    assert lr_factor(60, 100, 20, "onecycle") == pytest.approx(0.5)
    assert lr_factor(99, 100, 20, "onecycle") == pytest.approx(1 / 80)
    assert lr_factor(100, 100, 20, "onecycle") == 0.0
    assert lr_factor(0, 100, 0, "onecycle") == 1.0


def test_multistep_multiplies_by_gamma_at_each_milestone_fraction_of_the_run():
    def f(step):
        return lr_factor(step, 200, 10, "multistep", (0.5, 0.75), gamma=0.2)

    # milestones at steps round(0.5 * 200) = 100 and round(0.75 * 200) = 150
    assert [f(s) for s in (10, 99, 100, 149, 150, 199)] == pytest.approx(
        [1.0, 1.0, 0.2, 0.2, 0.04, 0.04])
    # a milestone inside the warm-up takes effect when the warm-up ends
    assert lr_factor(5, 200, 10, "multistep", (0.01,)) == pytest.approx(0.6)
    assert lr_factor(10, 200, 10, "multistep", (0.01,)) == pytest.approx(0.1)


def test_constant_after_warmup():
    assert lr_factor(WARMUP, TOTAL, WARMUP, "constant") == 1.0
    assert lr_factor(TOTAL + 5, TOTAL, WARMUP, "constant") == 1.0
