"""The optimizer, its parameter groups and its learning-rate schedule, built from
`OptimConfig`.

Parameter groups: the filters train at `optim.lr` with `optim.weight_decay`; biases
(BatchNorm shifts, convolution biases) at lr * bias_lr_scale with weight_decay /
bias_lr_scale (the product of the two, which sets how fast weight decay shrinks them, stays
the filters'); the classifier (`fc`) at lr * head_lr_scale. A whitening layer's bias
(models/airbench.py) trains for the first `optim.whiten_bias_epochs` epochs only, then its
learning rate is 0. Frozen parameters (requires_grad False) are in no group. Groups with the
same settings are one group, so a model without such parts has exactly one, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from cifarlab.config import OptimConfig
from cifarlab.schedule import lr_factor

# What a group's settings are made of, kept in the group so that a resumed optimizer can
# take new settings (set_hyperparameters).
LR_SCALE, WD_SCALE, STOP_EPOCH = "lr_scale", "wd_scale", "stop_epoch"


def parameter_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """The model's trainable parameters in groups (see the module's docstring); the
    filters' group first, as the one whose learning rate is reported."""
    whiten = getattr(model, "whiten", None)
    whiten_bias = getattr(whiten, "bias", None)
    head = getattr(model, "fc", None)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        lr_scale, wd_scale, stop = 1.0, 1.0, None
        if p.ndim <= 1:
            lr_scale, wd_scale = optim.bias_lr_scale, 1 / optim.bias_lr_scale
        if id(p) in head_ids:
            lr_scale *= optim.head_lr_scale
        if p is whiten_bias:
            stop = optim.whiten_bias_epochs
        groups.setdefault((lr_scale, wd_scale, stop), []).append(p)
    ordered = sorted(groups.items(), key=lambda kv: kv[0] != (1.0, 1.0, None))
    return [{"params": params, "lr": optim.lr * lr_scale,
             "weight_decay": optim.weight_decay * wd_scale,
             LR_SCALE: lr_scale, WD_SCALE: wd_scale, STOP_EPOCH: stop}
            for (lr_scale, wd_scale, stop), params in ordered]


def build_optimizer(model: nn.Module | Iterable[nn.Parameter], optim: OptimConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """SGD (momentum, optionally Nesterov; weight decay added to the gradient) or AdamW
    (betas 0.9 and 0.999, decoupled weight decay), fused into one kernel for all parameters
    on CUDA. A model gets parameter_groups; bare parameters are one group."""
    params = (parameter_groups(model, optim) if isinstance(model, nn.Module)
              else list(model))
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


def schedule_warning(optim: OptimConfig, epochs: int) -> str | None:
    """A warning for a warm-up that does not end inside the run: the learning rate never
    reaches optim.lr and never decays (a short demo run with the seed's 5 warm-up epochs)."""
    if optim.warmup_epochs < epochs:
        return None
    return (f"the {optim.warmup_epochs:g}-epoch warm-up does not end inside this {epochs}-epoch "
            f"run: the learning rate only climbs towards {optim.lr:g} and never decays; e.g. "
            f"--set optim.warmup_epochs={max(epochs // 5, 0)} or more --epochs")


def group_schedules(optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float],
                    steps_per_epoch: int) -> list[Callable[[int], float]]:
    """Each group's multiplier of its base learning rate: `lr_at`, and 0 from the step its
    group stops training on (STOP_EPOCH)."""
    def stopping(stop_step: int) -> Callable[[int], float]:
        return lambda step: lr_at(step) if step < stop_step else 0.0

    return [lr_at if group.get(STOP_EPOCH) is None
            else stopping(round(group[STOP_EPOCH] * steps_per_epoch))
            for group in optimizer.param_groups]


def set_hyperparameters(optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LambdaLR, optim: OptimConfig
                        ) -> None:
    """After loading a saved optimizer and scheduler: the saved state carries the old
    hyperparameters, and the changes allowed on resume win."""
    scheduler.base_lrs = [optim.lr * g.get(LR_SCALE, 1.0) for g in optimizer.param_groups]
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs,
                                      scheduler.lr_lambdas, strict=True):
        group.update(initial_lr=base_lr, lr=base_lr * factor(scheduler.last_epoch),
                     weight_decay=optim.weight_decay * group.get(WD_SCALE, 1.0))
        if optim.name == "sgd":
            group.update(momentum=optim.momentum, nesterov=optim.nesterov)
