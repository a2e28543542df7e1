"""training/optim.py: the optimizer from the settings, the schedule, resume overrides."""

import pytest
import torch

from cifarlab.config import OptimConfig
from cifarlab.training.optim import (
    build_optimizer,
    schedule_of,
    schedule_warning,
    set_hyperparameters,
)

CPU = torch.device("cpu")


def params():
    return [torch.nn.Parameter(torch.ones(3))]


def test_sgd_with_nesterov_momentum_and_weight_decay():
    opt = build_optimizer(params(), OptimConfig(lr=0.2, nesterov=True, weight_decay=1e-4), CPU)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.2, 0.9, True, 1e-4)
    assert not group["fused"]


def test_adamw_has_decoupled_weight_decay():
    p = params()
    opt = build_optimizer(p, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05), CPU)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.05
    # Decoupled: with a zero gradient, one step only shrinks the weights by lr * wd.
    p[0].grad = torch.zeros(3)
    opt.step()
    assert torch.allclose(p[0].detach(), torch.full((3,), 1 - 1e-3 * 0.05))


def test_schedule_of_counts_warmup_and_run_in_steps():
    lr_at = schedule_of(OptimConfig(schedule="multistep", warmup_epochs=1, milestones=(0.5,),
                                    gamma=0.1), epochs=4, steps_per_epoch=10)
    assert [lr_at(s) for s in (0, 9, 19, 20, 39)] == pytest.approx([0.1, 1, 1, 0.1, 0.1])


def test_resume_overrides_take_the_new_hyperparameters():
    optim = OptimConfig(lr=0.1, warmup_epochs=0, schedule="constant")
    opt = build_optimizer(params(), optim, CPU)
    lr_at = schedule_of(optim, epochs=2, steps_per_epoch=5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    changed = OptimConfig(lr=0.05, momentum=0.8, weight_decay=0.0, warmup_epochs=0,
                          schedule="constant")
    set_hyperparameters(opt, scheduler, changed)
    group = opt.param_groups[0]
    assert (group["lr"], group["initial_lr"], group["momentum"], group["weight_decay"]) == (
        0.05, 0.05, 0.8, 0.0)
    assert scheduler.base_lrs == [0.05]
    adamw = build_optimizer(params(), OptimConfig(name="adamw"), CPU)
    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, lr_at)
    set_hyperparameters(adamw, scheduler, OptimConfig(name="adamw", lr=0.01))
    assert "momentum" not in adamw.param_groups[0] and adamw.param_groups[0]["lr"] == 0.01


def test_a_warm_up_longer_than_the_run_is_a_warning():
    seed = OptimConfig()  # 5 warm-up epochs
    message = schedule_warning(seed, 3)
    assert "5-epoch warm-up does not end inside this 3-epoch run" in message
    assert "--set optim.warmup_epochs=0" in message
    assert schedule_warning(seed, 6) is None
    assert schedule_warning(OptimConfig(warmup_epochs=0), 1) is None
