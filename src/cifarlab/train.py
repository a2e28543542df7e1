"""`fit(config)`: one training run, top to bottom, into its run folder."""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cifarlab import checkpoint
from cifarlab.config import Config
from cifarlab.data.cpu_augment import train_transform
from cifarlab.data.loader import build_train_loader
from cifarlab.data.splits import Splits, prepare_splits
from cifarlab.errors import UserError
from cifarlab.evaluate import evaluate
from cifarlab.models import create_model
from cifarlab.schedule import lr_factor

log = logging.getLogger("cifarlab")

METRICS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")


@dataclass
class FitResult:
    run_dir: str
    best_val_acc: float  # percent
    best_epoch: int  # 1-based
    test_acc: float | None  # percent, of the best checkpoint; None without test data
    epochs_run: int
    stopped_early: bool
    train_seconds: float  # wall time of all epochs, validation included
    device: str
    torch_version: str
    classes: list[str]
    test_per_class_acc: list[float | None] | None  # None for a class without test images


@dataclass
class EarlyStopping:
    """Tracks the best validation accuracy; stops after `patience` epochs without a new best
    (patience 0: never stops)."""

    patience: int
    best: float = -1.0
    best_epoch: int = 0
    epochs_since_best: int = 0

    def update(self, epoch: int, value: float) -> bool:
        """Record one epoch's value; True when it is a new best."""
        if value > self.best:
            self.best, self.best_epoch, self.epochs_since_best = value, epoch, 0
            return True
        self.epochs_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.epochs_since_best >= self.patience


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full float32."""
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]


def run_dir_for(config: Config) -> Path:
    name = config.name or f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.out) / name


def check_run_dir(run_dir: Path) -> None:
    """Refuse a used run folder or an unwritable place before any work is done."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run folder {run_dir} already exists; choose another --name or --out")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the run folder {run_dir}: {parent} is not a writable "
                        "folder; choose another --out")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    # On the CPU the model competes with the workers for the same cores.
    return min(16, cores) if device.type == "cuda" else min(4, cores // 2)


def checkpoint_payload(
    model: nn.Module, config: Config, splits: Splits, epoch: int, val_acc: float
) -> dict[str, Any]:
    return {
        "format": checkpoint.FORMAT,
        "version": checkpoint.VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_args": {
            "name": config.model.name,
            "num_classes": len(splits.classes),
            "width": config.model.width,
        },
        "classes": list(splits.classes),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "config": config.to_dict(),
        "epoch": epoch,
        "val_acc": val_acc,
    }


def fit(config: Config) -> FitResult:
    """Train `config` and write its run folder; raise UserError on bad input before
    anything is written."""
    config.validate()
    device = resolve_device(config.device)
    amp_dtype = resolve_amp(config.amp, device)
    run_dir = run_dir_for(config)
    check_run_dir(run_dir)
    splits = prepare_splits(config.data)
    seed_everything(config.seed)
    model = create_model(
        config.model.name, num_classes=len(splits.classes), width=config.model.width
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.yaml")
    file_log = logging.FileHandler(run_dir / "train.log")
    log.addHandler(file_log)
    try:
        return _train(config, splits, model, device, amp_dtype, run_dir)
    finally:
        log.removeHandler(file_log)
        file_log.close()


def _train(
    config: Config,
    splits: Splits,
    model: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    run_dir: Path,
) -> FitResult:
    memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
    model = model.to(device, memory_format=memory_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    criterion = nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.optim.lr,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
        nesterov=config.optim.nesterov,
    )
    workers = config.data.workers if config.data.workers >= 0 else default_workers(device)
    loader, sampler = build_train_loader(
        torch.from_numpy(splits.train.images),
        torch.from_numpy(splits.train.labels),
        train_transform(config.data.augment, splits.mean, splits.std),
        batch_size=config.batch_size,
        seed=config.seed,
        workers=workers,
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = len(loader)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.optim.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, config.optim.schedule)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        f"run {run_dir}: {config.model.name} width {config.model.width} ({n_params:,} parameters)"
        f" on {device.type}, amp {amp_dtype or 'off'}; {len(splits.train.labels):,} train / "
        f"{len(splits.val.labels):,} val / "
        f"{len(splits.test.labels) if splits.test else 0:,} test images, "
        f"{len(splits.classes)} classes"
    )
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerow(METRICS)

    early_stopping = EarlyStopping(config.patience)
    show_progress = sys.stderr.isatty()
    train_start = time.perf_counter()
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        sampler.set_epoch(epoch)
        model.train()
        # Running sums stay on the device so that no step waits for the host.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        for x, y in tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not show_progress):
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
                loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            loss_sum += loss.detach().float() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)

        val = evaluate(model, splits.val, splits.mean, splits.std, device,
                       amp_dtype=amp_dtype, criterion=criterion)
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": float(loss_sum) / seen,
            "train_acc": 100.0 * float(correct) / seen,
            "val_loss": val.loss,
            "val_acc": val.acc,
            "seconds": time.perf_counter() - epoch_start,
        }
        with open(run_dir / "metrics.csv", "a", newline="") as f:
            csv.writer(f).writerow([f"{row[k]:.6g}" if k != "epoch" else row[k] for k in METRICS])

        improved = early_stopping.update(epoch, val.acc)
        payload = checkpoint_payload(model, config, splits, epoch, val.acc)
        if improved:
            checkpoint.save_atomic(payload, run_dir / "best.pt")
        checkpoint.save_atomic(payload, run_dir / "last.pt")
        log.info(
            f"epoch {epoch:>3}/{config.epochs}  lr {lr:.4f}  "
            f"train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}%  "
            f"{row['seconds']:.1f}s{'  *best' if improved else ''}"
        )
        if early_stopping.should_stop:
            log.info(f"early stop: no better validation accuracy in {config.patience} epochs")
            break
    train_seconds = time.perf_counter() - train_start

    test_acc, test_per_class = None, None
    if splits.test is not None:
        best = checkpoint.load(run_dir / "best.pt")
        model.load_state_dict(best["model"])
        test = evaluate(model, splits.test, splits.mean, splits.std, device, amp_dtype=amp_dtype)
        test_acc = test.acc
        test_per_class = [None if np.isnan(a) else a for a in test.per_class_acc]
        log.info(f"test accuracy of the best checkpoint (epoch {early_stopping.best_epoch}): "
                 f"{test_acc:.2f}%")

    result = FitResult(
        run_dir=str(run_dir),
        best_val_acc=early_stopping.best,
        best_epoch=early_stopping.best_epoch,
        test_acc=test_acc,
        epochs_run=epoch,
        stopped_early=early_stopping.should_stop,
        train_seconds=train_seconds,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch_version=torch.__version__,
        classes=list(splits.classes),
        test_per_class_acc=test_per_class,
    )
    (run_dir / "result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    log.info(f"best validation accuracy {result.best_val_acc:.2f}% at epoch {result.best_epoch}; "
             f"{train_seconds:.1f}s; results in {run_dir}")
    return result
