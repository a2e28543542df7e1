"""What a run trains with, built once from its config: the model in its layout (DDP around
it under torchrun), the optimizer, the schedule, the loss scaler, mixing, EMA, the
distillation teacher, the training batches (the torchvision loader or the resident one),
and the one line that describes it all at the start of the run."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cifarlab.config import Config
from cifarlab.data.cpu_augment import train_transform
from cifarlab.data.loader import EpochBatchSampler, build_train_loader
from cifarlab.data.resident import ResidentLoader, build_resident_loader
from cifarlab.data.splits import Splits
from cifarlab.devices import Precision, compiled, memory_format
from cifarlab.distributed import World
from cifarlab.models import create_model, initialise_from_data, model_args
from cifarlab.step import TrainStep
from cifarlab.training.distill import DistillLoss, Teacher
from cifarlab.training.ema import ModelEma
from cifarlab.training.lookahead import Lookahead
from cifarlab.training.mixing import build_mixer, no_mixing
from cifarlab.training.optim import build_optimizer, group_schedules, schedule_of
from cifarlab.training.pace import Pace


@dataclass
class Parts:
    """What a run trains with, built once by `build_parts`."""

    model: nn.Module  # what is evaluated and saved
    train_model: nn.Module  # what steps: `model`, or DDP around it (averages the gradients)
    step: TrainStep  # owns the optimizer, scheduler, scaler and EMA
    criterion: nn.Module  # validation loss: cross-entropy with the run's label smoothing
    mix: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # training/mixing.py
    ema: ModelEma | None
    lr_at: Callable[[int], float]  # multiplier of optim.lr at each step
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]]
    sampler: EpochBatchSampler | ResidentLoader  # positions the loader: set_epoch(epoch, step)
    layout: torch.memory_format  # of the model and its batches (devices.memory_format)
    teacher: Teacher | None = None  # distillation: frozen, seen by the step, never saved
    pace: Pace | None = None  # says at the start when a CPU run will take hours


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    # On the CPU the model competes with the workers for the same cores.
    return min(16, cores) if device.type == "cuda" else min(4, cores // 2)


def make_loader(
    config: Config, splits: Splits, device: torch.device, world: World
) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], EpochBatchSampler | ResidentLoader]:
    """The training batches of one rank and the object that positions them
    (`set_epoch(epoch, start_step)`); both paths yield the same images at each step."""
    kind = config.data.loader
    if kind == "auto":  # alternating flips follow each image: the resident loader does them
        batch_only = config.data.augment.flip_mode == "alternate"
        kind = "resident" if device.type == "cuda" or batch_only else "torchvision"
    common = dict(batch_size=config.batch_size // world.size, seed=config.seed,
                  rank=world.rank, world_size=world.size)
    if kind == "resident":
        loader = build_resident_loader(splits.train.images, splits.train.labels,
                                       config.data.augment, splits.mean, splits.std,
                                       device=device, compile_mode=config.compile, **common)
        return loader, loader
    workers = config.data.workers if config.data.workers >= 0 else default_workers(device)
    return build_train_loader(
        torch.from_numpy(splits.train.images),
        torch.from_numpy(splits.train.labels),
        train_transform(config.data.augment, splits.mean, splits.std),
        workers=workers,
        pin_memory=device.type == "cuda",
        **common,
    )


def build_model(config: Config, splits: Splits, state: dict[str, Any] | None,
                initial: dict[str, Any] | None, log: logging.Logger) -> nn.Module:
    """The model a run starts from: the architecture of its last.pt (`state`) or of the
    checkpoint it starts from (`initial`, a pruned one's included), else config.model's.
    `initial`'s weights are loaded; where the data has another number of classes (transfer,
    e.g. CIFAR-10 to CIFAR-100) the classifier is new and starts from its initialisation. A
    new model has its data-set layers set from the training images (airbench's whitening)."""
    start = state or initial
    args = dict(start["model_args"]) if start else model_args(
        config.model.name, len(splits.classes), config.model.width)
    if initial is not None:
        args["num_classes"] = len(splits.classes)
    model = create_model(**args)
    if initial is not None:
        own = model.state_dict()
        fresh = [k for k, v in initial["model"].items() if k in own and own[k].shape != v.shape]
        model.load_state_dict({**initial["model"], **{k: own[k] for k in fresh}})
        if fresh:
            log.info(f"a new classifier for the data's {len(splits.classes)} classes: "
                     f"{', '.join(fresh)} start from their initialisation")
    elif state is None:
        initialise_from_data(model, splits.train.images, splits.mean, splits.std)
    return model


def build_parts(config: Config, splits: Splits, model: nn.Module, device: torch.device,
                amp_dtype: torch.dtype | None, world: World, teacher: Teacher | None = None
                ) -> Parts:
    if config.sync_batchnorm and world.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    layout = memory_format(device, model)  # on the CPU, NCHW where oneDNN would fail (devices.py)
    model = model.to(device, memory_format=layout)
    train_model = model
    if world.distributed:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = build_optimizer(model, config.optim, device)
    loader, sampler = make_loader(config, splits, device, world)
    lr_at = schedule_of(config.optim, config.epochs, len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  group_schedules(optimizer, lr_at, len(loader)))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    mixer, train_loss = build_mixer(config.mix, len(splits.classes),
                                    config.optim.label_smoothing, config.seed, world.rank)
    if teacher is not None:
        train_loss = DistillLoss(train_loss, config.distill.temperature, config.distill.alpha)
    ema = ModelEma(model, config.ema.decay) if config.ema.enabled else None
    optim = config.optim
    lookahead = Lookahead(model, optim.lookahead_steps, optim.lookahead_decay,
                          config.epochs * len(loader)) if optim.lookahead_steps else None
    step = TrainStep(compiled(train_model, config.compile, device), train_loss, optimizer,
                     scaler, scheduler, amp_dtype, ema,
                     teacher.model if teacher is not None else None,
                     optim.clip_grad_norm, optim.accumulate, lookahead)
    return Parts(model, train_model, step,
                 nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing),
                 mixer or no_mixing, ema, lr_at, loader, sampler, layout, teacher)


def describe_run(config: Config, splits: Splits, model: nn.Module, device: torch.device,
                 precision: Precision, world: World, run_dir: Path) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    optim, mix = config.optim, config.mix
    mixing = (f"mixup alpha {mix.mixup_alpha:g}, CutMix alpha {mix.cutmix_alpha:g} "
              f"(p {mix.prob:g}, switch {mix.switch_prob:g})"
              if mix.mixup_alpha or mix.cutmix_alpha else "no mixup/CutMix")
    ema = f"EMA decay {config.ema.decay:g}" if config.ema.enabled else "no EMA"
    if optim.lookahead_steps:
        ema += (f", lookahead every {optim.lookahead_steps} steps (decay up to "
                f"{optim.lookahead_decay:.3g})")
    chosen = "EMA weights" if config.ema.select == "ema" else "model's weights"
    kd = config.distill
    distilled = (f", distilled from {kd.teacher} (T {kd.temperature:g}, alpha {kd.alpha:g})"
                 if kd.teacher else "")
    return (
        f"run {run_dir}: {config.model.name} width {config.model.width} ({n_params:,} "
        f"parameters) on {world.size} x {device.type} ({torch.get_num_threads()} threads), "
        f"{precision.reason}; "
        f"{len(splits.train.labels):,} train / {len(splits.val.labels):,} val / "
        f"{len(splits.test.labels) if splits.test else 0:,} test images, "
        f"{len(splits.classes)} classes; {optim.name}{' nesterov' if optim.nesterov else ''} "
        f"lr {optim.lr:g}, {optim.schedule} schedule, batch {config.batch_size}"
        f"{f' in {optim.accumulate} pieces' if optim.accumulate > 1 else ''}, "
        f"{mixing}, {ema}{distilled}; the best "
        f"checkpoint is chosen on the validation accuracy of the {chosen}"
    )
