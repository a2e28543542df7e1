"""The optimizer and its learning-rate schedule, built from `OptimConfig`."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from cifarlab.config import OptimConfig
from cifarlab.schedule import lr_factor


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """SGD (momentum, optionally Nesterov; weight decay added to the gradient) or AdamW
    (betas 0.9 and 0.999, decoupled weight decay), fused into one kernel for all parameters
    on CUDA."""
    fused = device.type == "cuda"
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay,
                                 fused=fused)
    return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum,
                           weight_decay=optim.weight_decay, nesterov=optim.nesterov,
                           fused=fused)


def schedule_of(optim: OptimConfig, epochs: int, steps_per_epoch: int
                ) -> Callable[[int], float]:
    """The multiplier of `optim.lr` at each optimizer step (0-based), as schedule.lr_factor
    gives it for this run's length and warm-up."""
    total_steps = epochs * steps_per_epoch
    warmup_steps = round(optim.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps, optim.schedule, optim.milestones,
                         optim.gamma)

    return lr_at


def set_hyperparameters(optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LambdaLR, optim: OptimConfig,
                        lr_at: Callable[[int], float]) -> None:
    """After loading a saved optimizer and scheduler: the saved state carries the old
    hyperparameters, and the changes allowed on resume win."""
    scheduler.base_lrs = [optim.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group.update(initial_lr=optim.lr, weight_decay=optim.weight_decay,
                     lr=optim.lr * lr_at(scheduler.last_epoch))
        if optim.name == "sgd":
            group.update(momentum=optim.momentum, nesterov=optim.nesterov)
