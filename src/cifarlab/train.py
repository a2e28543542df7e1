"""`fit(config)`: one training run, top to bottom, into its run folder.

A run can stop at any instant and go on exactly where it was: `last.pt` holds everything
the next step depends on (weights, optimizer, schedule, loss scale, early stopping, the
history, RNG states, and the position in the epoch: the loader's order and augmentation are
functions of (seed, epoch, position), see data/loader.py).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cifarlab import checkpoint, distributed, locks, memory
from cifarlab.config import Config, flat_settings
from cifarlab.data.cpu_augment import train_transform
from cifarlab.data.loader import EpochBatchSampler, build_train_loader
from cifarlab.data.resident import ResidentLoader, build_resident_loader
from cifarlab.data.splits import Splits, prepare_splits
from cifarlab.distributed import World
from cifarlab.errors import TrainingFailed, TrainingInterrupted, UserError
from cifarlab.evaluate import evaluate
from cifarlab.interrupt import StopRequest, heartbeat
from cifarlab.models import LAYERS, architecture, create_model, initialise_from_data, model_args
from cifarlab.precision import Precision, check_amp, choose, resolve_device
from cifarlab.report import write_report
from cifarlab.step import Flags, StepFlags, TrainStep, check_compile, compiled, memory_format
from cifarlab.training.board import Board, check_available
from cifarlab.training.distill import DistillLoss, Teacher, describe, load_teacher
from cifarlab.training.ema import ModelEma
from cifarlab.training.mixing import build_mixer, no_mixing
from cifarlab.training.optim import (
    build_optimizer,
    group_schedules,
    schedule_of,
    schedule_warning,
    set_hyperparameters,
)
from cifarlab.training.pace import Pace

log = logging.getLogger("cifarlab")

METRICS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")
EMA_METRICS = ("ema_val_loss", "ema_val_acc")  # before `seconds`, when EMA is on
# Steps between a step and the host reading its flags (step.StepFlags); the device runs
# that far ahead of the checks. A NaN loss therefore stops training FLAG_LAG steps late at
# most, before any checkpoint is written from the poisoned weights.
FLAG_LAG = 2
MIN_LOSS_SCALE = 1.0  # fp16: a GradScaler scale under this means steps keep being skipped
# An epoch's running sums before its first step (last.pt keeps them for an epoch cut short).
NO_PARTIAL_EPOCH = {"loss_sum": 0.0, "correct": 0, "seen": 0}


@dataclass
class FitResult:
    run_dir: str
    best_val_acc: float  # percent
    best_epoch: int  # 1-based
    selected: str  # "model" or "ema": the weights best.pt holds and best_val_acc measures
    test_acc: float | None  # percent, of the best checkpoint; None without test data
    epochs_run: int
    stopped_early: bool
    train_seconds: float  # wall time of all epochs, validation included, over all resumes
    device: str
    world_size: int  # processes (GPUs) that trained together
    torch_version: str
    classes: list[str]
    test_per_class_acc: list[float | None] | None  # None for a class without test images
    test_confusion: list[list[int]] | None  # rows: true class, columns: predicted
    data: dict[str, Any]  # image counts per split, measured per-channel mean and std
    teacher: dict[str, Any] | None = None  # the distillation teacher (training/distill.py)
    precision: str = "float32"  # what the steps ran in: float32, fp16 or bf16 (autocast)
    precision_reason: str = ""  # why (precision.choose)
    threads: int = 0  # torch's intra-op threads per process


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


def run_dir_for(config: Config) -> Path:
    name = config.name or f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.out) / name


def existing_ancestor(path: Path) -> Path:
    """`path` itself, or its nearest parent that exists (where it would be created)."""
    while not path.exists():
        path = path.parent
    return path


# In a run folder while a process trains it (locks.py); an empty one is left behind.
RUN_LOCK = ".run.lock"


def hold_run_folder(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """One process trains a run folder at a time: a second `train` with the same --name, or
    a second --resume of the run, is refused while the first runs (their checkpoints would
    overwrite each other's)."""
    return locks.hold(run_dir / RUN_LOCK, lambda holder: (
        f"run folder {run_dir} is in use by another cifarlab process ({holder}); wait for it "
        "to end, or train into another --name"))


def check_run_dir(run_dir: Path) -> None:
    """Refuse a used run folder or an unwritable place before any work is done."""
    if run_dir.exists() and any(p.name != RUN_LOCK for p in run_dir.iterdir()):
        raise UserError(f"run folder {run_dir} already exists; choose another --name or --out, "
                        f"or continue it with --resume {run_dir}")
    parent = existing_ancestor(run_dir)
    try:  # a real write: permissions alone miss read-only mounts and special file systems
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError:
        raise UserError(f"cannot write the run folder {run_dir}: {parent} is not a writable "
                        "folder; choose another --out") from None


def check_disk_space(run_dir: Path, model: nn.Module) -> None:
    """Refuse to start when the checkpoints (best, last with momentum, and a temporary copy
    while saving) clearly cannot fit."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    needed = 4 * weights + (16 << 20)
    parent = existing_ancestor(run_dir)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise UserError(f"only {free / 1e6:.0f} MB free under {parent}, checkpoints need about "
                        f"{needed / 1e6:.0f} MB; free space or choose another --out")


def load_resume_state(run_dir: Path, config: Config) -> dict[str, Any]:
    """`last.pt` of a run to continue, checked against the config it continues with."""
    path = run_dir / "last.pt"
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: no last.pt there; give a run folder of cifarlab")
    state = checkpoint.load(path)
    if "train_state" not in state:
        raise UserError(f"--resume {run_dir}: last.pt holds no training state")
    check_same_run(run_dir, state.get("run_id"))
    args = state["model_args"]
    wanted = model_args(config.model.name, args["num_classes"], config.model.width)
    if {k: v for k, v in args.items() if k != LAYERS} != wanted:  # a pruned model's layers
        raise UserError(f"--resume {run_dir}: last.pt holds {_describe(args)}, the config asks "
                        f"for {_describe(wanted)}")
    saved_optimizer = state.get("config", {}).get("optim", {}).get("name", "sgd")
    if saved_optimizer != config.optim.name:
        raise UserError(f"--resume {run_dir}: the run trained with optim.name={saved_optimizer}"
                        f", whose state cannot continue as {config.optim.name}; start a new run")
    epoch, _ = state["train_state"]["position"]
    stopper = EarlyStopping(**state["train_state"]["early_stopping"])
    if epoch > config.epochs or stopper.should_stop:
        raise UserError(f"--resume {run_dir}: the run is finished ({epoch - 1} epochs"
                        f"{', stopped early' if stopper.should_stop else ''}); to train longer "
                        "raise --epochs (and --set patience=...) with --allow-changes")
    return state


def check_same_run(run_dir: Path, ckpt_id: str | None) -> None:
    """Refuse a last.pt that another run wrote (copied in from elsewhere), --allow-changes or
    not. A folder and checkpoint that both lack an id are a run from before run ids: it
    resumes and gets an id then."""
    folder_id = checkpoint.read_run_id(run_dir)
    path = run_dir / "last.pt"
    if folder_id == ckpt_id:
        return
    if folder_id is None:
        raise UserError(f"{path} belongs to run {ckpt_id}, but {run_dir} has no "
                        f"{checkpoint.RUN_ID_FILE} file; if it is this run's own checkpoint, "
                        f"write its id there: echo {ckpt_id} > {run_dir / checkpoint.RUN_ID_FILE}")
    if ckpt_id is None:
        raise UserError(f"{path} carries no run id, so this run (id {folder_id}) did not write "
                        "it; put back the run's own last.pt, or start a new run")
    raise UserError(f"{path} belongs to another run (id {ckpt_id}; this folder is run "
                    f"{folder_id}); put back the run's own last.pt, or start a new run with "
                    f"--config {run_dir / 'config.yaml'} --name NEW_NAME")


def _describe(args: dict[str, Any]) -> str:
    """`resnet18 width 64`, `resnet20 channels [16, 32, 64]`: a model and its arguments."""
    arch = [f"{k} {v}" for k, v in args.items() if k not in ("name", "num_classes", LAYERS)]
    return " ".join([args["name"], *arch, *(["pruned"] if LAYERS in args else [])])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def set_deterministic(enabled: bool) -> None:
    """Deterministic CUDA kernels where PyTorch has them (an op without one raises)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled and torch.cuda.is_available()


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


def weights_payload(
    model: nn.Module, config: Config, splits: Splits, epoch: int, val_acc: float | None
) -> dict[str, Any]:
    """What best.pt holds, and last.pt on top of its training state (see checkpoint.py)."""
    return {
        "format": checkpoint.FORMAT,
        "version": checkpoint.VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_args": architecture(
            model, model_args(config.model.name, len(splits.classes), config.model.width)),
        "classes": list(splits.classes),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "config": config.to_dict(),
        "epoch": epoch,
        "val_acc": val_acc,
    }


def save(payload: dict[str, Any], path: Path) -> None:
    """Write a checkpoint into its run folder, tagged with the folder's run id."""
    payload["run_id"] = checkpoint.read_run_id(path.parent)
    try:
        checkpoint.save_atomic(payload, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise TrainingFailed(
            f"could not write {path} ({reason}); the previous checkpoint is kept; free disk "
            f"space, then continue with: cifarlab train --resume {path.parent}"
        ) from None


def write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    """metrics.csv from the history in last.pt, rewritten whole so that the two agree."""
    columns = METRICS
    if any("ema_val_acc" in row for row in history):  # empty cells for epochs without EMA
        columns = (*METRICS[:-1], *EMA_METRICS, METRICS[-1])
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    for row in history:
        writer.writerow([row["epoch"], *(f"{row[k]:.6g}" if k in row else ""
                                         for k in columns[1:])])
    checkpoint.write_atomic(run_dir / "metrics.csv", lambda f: f.write(text.getvalue().encode()))


def check_flags(flags: list[Flags], epoch: int, config: Config) -> bool:
    """Raise when a step's loss was NaN or infinite; return whether a stop was requested."""
    for f in flags:
        if f.loss_not_finite:
            raise TrainingFailed(
                f"the training loss became NaN or infinite at epoch {epoch}, step {f.step}; "
                f"the checkpoints from before are kept; lower the learning rate (--lr, now "
                f"{config.optim.lr:g}) or train in float32 (--amp off)"
            )
    return any(f.stop_requested for f in flags)


def check_loss_scale(scaler: torch.amp.GradScaler, epoch: int) -> None:
    """fp16: the GradScaler halves its scale at each skipped (overflowing) step; a scale
    under MIN_LOSS_SCALE means steps kept being skipped, so the weights stopped learning."""
    if scaler.is_enabled() and scaler.get_scale() < MIN_LOSS_SCALE:
        raise TrainingFailed(
            f"fp16 gradients overflowed step after step (loss scale {scaler.get_scale():g}) "
            f"in epoch {epoch}; the checkpoints from before are kept; use --amp bf16 or "
            "lower --lr"
        )


def fit(config: Config, *, resume: str | Path | None = None,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        initial: dict[str, Any] | None = None) -> FitResult:
    """Train `config` into a new run folder, or continue the run folder `resume`.

    `initial`: a checkpoint ({"model_args", "model"}) whose architecture and weights the
    run starts from instead of a new model of config.model (fine-tuning a pruned model);
    its name must be config.model.name. A resumed run takes both from its own last.pt.

    `on_epoch(epoch, row)` is called after each epoch once its checkpoints and metrics.csv
    are written (rank 0 alone); `row` is that epoch's line of metrics.csv. An exception it
    raises ends training there and leaves the run unfinished, resumable from last.pt.

    Under torchrun each process calls this; rank 0 alone writes files and logs. At the end
    rank 0 writes the run's report (report.md, report.html and their figures).
    Raises UserError on bad input before anything is written, TrainingFailed when training
    cannot go on, TrainingInterrupted after a SIGINT/SIGTERM (with last.pt saved).
    """
    config.validate()
    device = resolve_device(config.device)
    world = distributed.init(device.type)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if config.sync_batchnorm and world.distributed and device.type != "cuda":
        raise UserError("sync_batchnorm needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU "
                        "version); drop --set sync_batchnorm=true")
    check_compile(config.compile, device)
    check_amp(config.amp, device)
    with torch.device("meta"):  # a width the architecture cannot take, before the data
        create_model(**model_args(config.model.name, 10, config.model.width))
    if config.tensorboard:
        check_available()
    if config.batch_size % world.size:
        raise UserError(f"batch_size {config.batch_size} is the global batch and must divide "
                        f"evenly over {world.size} processes; change --batch-size")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, once taken
            return _fit(config, resume, device, world, held, on_epoch, initial)
    finally:
        torch.set_num_threads(threads)  # as it was for the caller
        distributed.shutdown()


def _fit(config: Config, resume: str | Path | None, device: torch.device, world: World,
         held: contextlib.ExitStack,
         on_epoch: Callable[[int, dict[str, float]], None] | None = None,
         initial: dict[str, Any] | None = None) -> FitResult:
    run_dir = Path(resume) if resume else distributed.broadcast(run_dir_for(config))
    if resume is None and distributed.restart_count() > 0 and (run_dir / "last.pt").exists():
        resume = run_dir  # torchrun restarted the workers: go on from the last checkpoint
    state = None
    if resume is None:
        check_run_dir(run_dir)
    else:
        if world.is_main:  # rank 0 alone writes the folder
            held.enter_context(hold_run_folder(run_dir))
            checkpoint.check_run_files(run_dir)
        state = load_resume_state(run_dir, config)
    # Rank 0 decodes and caches the data first; the others then read the cache.
    if not world.is_main:
        distributed.barrier()
    splits = prepare_splits(config.data)
    if world.is_main:
        distributed.barrier()
    if state is not None and state["classes"] != splits.classes:
        raise UserError(f"--resume {run_dir}: the data's classes {splits.classes} differ from "
                        f"the run's {state['classes']}")
    per_rank = -(-len(splits.train.labels) // world.size)
    if config.batch_size // world.size > per_rank and world.is_main:
        log.warning(f"batch_size {config.batch_size} is larger than the "
                    f"{len(splits.train.labels):,} training images"
                    f"{' of each process' if world.distributed else ''}: each epoch is one "
                    f"step of them all; for more steps use --batch-size "
                    f"{per_rank * world.size // 4 or 1} or so (and scale --lr with it)")
    teacher = None  # checked against the data before anything is written
    if config.distill.teacher:
        teacher = load_teacher(config.distill.teacher, splits, asdict(config.data), device)
    # Before the model is built: a model too large for the memory is refused, not allocated.
    memory.check_fits(config.model.name, len(splits.classes), config.model.width,
                      min(config.batch_size // world.size, per_rank), device)
    seed_everything(config.seed)
    start = state or initial  # a pruned model's architecture is in its checkpoint
    model = create_model(**(start["model_args"] if start else model_args(
        config.model.name, len(splits.classes), config.model.width)))
    if initial is not None:
        model.load_state_dict(initial["model"])
    elif state is None:  # a new model: layers set from the training images (airbench's)
        initialise_from_data(model, splits.train.images, splits.mean, splits.std)
    # Measured on rank 0 alone (on the CPU), so that every rank trains in the same precision.
    precision = distributed.broadcast(choose(
        config.amp, device, model, config.batch_size // world.size,
        memory_format(device, model), len(splits.classes)) if world.is_main else None)
    check_disk_space(run_dir, model)
    distributed.barrier()  # every rank has checked the run folder before rank 0 creates it

    file_log = None
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:  # a process that started with this one may have taken the folder
            held.enter_context(hold_run_folder(run_dir))
            check_run_dir(run_dir)
        for finished in ("result.json", "report.md", "report.html"):
            (run_dir / finished).unlink(missing_ok=True)  # a resumed run is unfinished again
        for leftover in checkpoint.remove_leftovers(run_dir):
            log.info(f"removed {leftover.name}, left by an interrupted save")
        checkpoint.write_atomic(run_dir / "config.yaml",
                                lambda f: f.write(config.to_yaml().encode()))
        if checkpoint.read_run_id(run_dir) is None:  # a new run, or one from before run ids
            checkpoint.write_run_id(run_dir, checkpoint.new_run_id())
        file_log = logging.FileHandler(run_dir / "train.log")
        log.addHandler(file_log)
    try:
        resume_note = (f"the checkpoints saved before are intact; continue with: cifarlab train "
                       f"--resume {run_dir}")
        with StopRequest(config.stop_grace, note=resume_note) as stop:
            result = _train(config, splits, model, device, precision, run_dir, state, stop,
                            world, on_epoch, teacher)
            if world.is_main:
                log.info(f"report: {write_report(run_dir)}")
        return result
    finally:
        if file_log is not None:
            log.removeHandler(file_log)
            file_log.close()
        if config.deterministic:
            set_deterministic(False)


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
    layout: torch.memory_format  # of the model and its batches (step.memory_format)
    teacher: Teacher | None = None  # distillation: frozen, seen by the step, never saved
    pace: Pace | None = None  # says at the start when a CPU run will take hours


@dataclass
class Progress:
    """Where the run stands; last.pt saves it with the weights and the optimizer."""

    early_stopping: EarlyStopping
    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 1  # the next step to run
    step: int = 0
    partial: dict[str, float] = field(default_factory=lambda: NO_PARTIAL_EPOCH)  # its sums
    earlier_seconds: float = 0.0  # training time before this process took over
    started: float = field(default_factory=time.perf_counter)  # when this process took over

    def seconds(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.started


def build_parts(config: Config, splits: Splits, model: nn.Module, device: torch.device,
                amp_dtype: torch.dtype | None, world: World, teacher: Teacher | None = None
                ) -> Parts:
    if config.sync_batchnorm and world.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    layout = memory_format(device, model)  # on the CPU, NCHW where oneDNN would fail (step.py)
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
    step = TrainStep(compiled(train_model, config.compile, device), train_loss, optimizer,
                     scaler, scheduler, amp_dtype, ema,
                     teacher.model if teacher is not None else None)
    return Parts(model, train_model, step,
                 nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing),
                 mixer or no_mixing, ema, lr_at, loader, sampler, layout, teacher)


def restore(parts: Parts, config: Config, state: dict[str, Any]) -> Progress:
    """Load last.pt's weights, optimizer, schedule, loss scale, EMA and RNG states; the
    progress it saved."""
    ts = state["train_state"]
    parts.model.load_state_dict(state["model"])
    optimizer, scheduler = parts.step.optimizer, parts.step.scheduler
    optimizer.load_state_dict(ts["optimizer"])
    scheduler.load_state_dict(ts["scheduler"])
    set_hyperparameters(optimizer, scheduler, config.optim)
    parts.step.scaler.load_state_dict(ts["scaler"])
    if parts.ema is not None:  # EMA switched on at resume: it starts from the weights
        parts.ema.load_state_dict(ts.get("ema", {"weights": state["model"], "updates": 0}))
    early_stopping = EarlyStopping(**ts["early_stopping"])
    early_stopping.patience = config.patience
    set_rng_states(ts["rng"])
    (epoch, step), partial = ts["position"], ts["partial_epoch"]
    return Progress(early_stopping, ts["history"], epoch, step, partial, ts["train_seconds"])


def save_last(run_dir: Path, parts: Parts, progress: Progress, position: tuple[int, int],
              partial: dict[str, float], payload: dict[str, Any]) -> None:
    """last.pt: the weights of `payload` and everything the step at `position` needs."""
    payload["train_state"] = {
        "optimizer": parts.step.optimizer.state_dict(),
        "scheduler": parts.step.scheduler.state_dict(),
        "scaler": parts.step.scaler.state_dict(),
        "early_stopping": asdict(progress.early_stopping),
        "history": progress.history,
        "position": list(position),
        "partial_epoch": partial,
        "train_seconds": progress.seconds(),
        "rng": rng_states(),
    }
    if parts.ema is not None:
        payload["train_state"]["ema"] = parts.ema.state_dict()
    if parts.teacher is not None:  # who it is, so that --resume can check; not its weights
        payload["train_state"]["teacher"] = parts.teacher.identity
    save(payload, run_dir / "last.pt")


def epoch_sums(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> dict[str, float]:
    """An epoch's running sums, added up over the ranks."""
    totals = distributed.all_reduce(torch.stack([loss_sum, correct.double(), torch.tensor(
        float(seen), dtype=torch.float64, device=loss_sum.device)])).tolist()
    return {"loss_sum": totals[0], "correct": int(totals[1]), "seen": int(totals[2])}


def train_epoch(parts: Parts, config: Config, epoch: int, step: int, partial: dict[str, float],
                flags: StepFlags, stop: StopRequest, device: torch.device,
                show_progress: bool) -> tuple[dict[str, float], int | None]:
    """Train `epoch` from `step` (0-based) on; the epoch's sums (`partial` included), and
    the step a stop was requested at (None when the epoch ran to its end)."""
    parts.sampler.set_epoch(epoch, step)
    parts.train_model.train()
    # Running sums stay on the device so that no step waits for the host.
    loss_sum = torch.tensor(partial["loss_sum"], dtype=torch.float64, device=device)
    correct = torch.tensor(partial["correct"], dtype=torch.int64, device=device)
    seen = partial["seen"]
    for x, y in tqdm(parts.loader, desc=f"epoch {epoch}", initial=step,
                     total=len(parts.loader), leave=False, disable=not show_progress):
        if check_flags(flags.ready(), epoch, config):
            # Stop here, after the steps already queued, once none of them went NaN.
            check_flags(flags.drain(), epoch, config)
            return epoch_sums(loss_sum, correct, seen), step
        x = x.to(device, non_blocking=True, memory_format=parts.layout)
        y = y.to(device, non_blocking=True)
        x, targets, labels = parts.mix(x, y, epoch, step)  # labels: the dominant ones
        loss, logits = parts.step(x, targets)
        loss_sum += loss.double() * len(y)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(y)
        step += 1
        flags.record(step, loss, stop.signum is not None)
        heartbeat()
        if parts.pace is not None:
            parts.pace.step()
    check_flags(flags.drain(), epoch, config)
    check_loss_scale(parts.step.scaler, epoch)
    return epoch_sums(loss_sum, correct, seen), None


def validate(parts: Parts, config: Config, splits: Splits, device: torch.device,
             amp_dtype: torch.dtype | None, world: World) -> dict[str, float]:
    """Validation loss and accuracy of the model, and of the EMA weights when there are."""
    scores = {}
    for prefix, model in [("", parts.model)] + ([("ema_", parts.ema.module)] if parts.ema else []):
        distributed.sync_buffers(model)
        val = evaluate(model, splits.val, splits.mean, splits.std, device, amp_dtype=amp_dtype,
                       criterion=parts.criterion, world=world, flip=config.tta_flip,
                       translate=config.tta_translate)
        scores |= {f"{prefix}val_loss": val.loss, f"{prefix}val_acc": val.acc}
    return scores


def epoch_line(row: dict[str, float], epochs: int, improved: bool) -> str:
    ema = (f"ema loss {row['ema_val_loss']:.4f} acc {row['ema_val_acc']:6.2f}%  "
           if "ema_val_acc" in row else "")
    return (f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4f}  "
            f"train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}%  {ema}"
            f"{row['seconds']:.1f}s{'  *best' if improved else ''}")


def _train(
    config: Config,
    splits: Splits,
    model: nn.Module,
    device: torch.device,
    precision: Precision,
    run_dir: Path,
    state: dict[str, Any] | None,
    stop: StopRequest,
    world: World,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    teacher: Teacher | None = None,
) -> FitResult:
    set_deterministic(config.deterministic)
    amp_dtype = precision.dtype
    parts = build_parts(config, splits, model, device, amp_dtype, world, teacher)
    model, steps_per_epoch = parts.model, len(parts.loader)
    progress = Progress(EarlyStopping(config.patience))
    if state is not None:
        progress = restore(parts, config, state)
        log.info(f"resuming {run_dir} at epoch {progress.epoch}, step {progress.step}")
    if world.is_main:
        steps_left = (config.epochs - progress.epoch + 1) * steps_per_epoch - progress.step
        parts.pace = Pace(steps_left, device.type, config.preset, log)
    log.info(describe_run(config, splits, model, device, precision, world, run_dir))
    if (warning := schedule_warning(config.optim, config.epochs)) and world.is_main:
        log.warning(warning)
    if teacher is not None:
        teacher.split_val_acc = evaluate(teacher.model, splits.val, splits.mean, splits.std,
                                         device, amp_dtype=amp_dtype, world=world,
                                         flip=config.tta_flip,
                                         translate=config.tta_translate).acc  # as the student
        log.info(describe(teacher))
    # The best checkpoint is chosen on, and holds, the model's weights or the EMA's.
    select = "ema" if config.ema.select == "ema" else "model"
    select_key = "ema_val_acc" if select == "ema" else "val_acc"
    board = Board(run_dir) if config.tensorboard and world.is_main else None

    def interrupted(epoch: int, step: int) -> TrainingInterrupted:
        return TrainingInterrupted(
            f"stopped by {stop.name} at epoch {epoch}, step {step}; progress is saved in "
            f"{run_dir / 'last.pt'}; continue with: cifarlab train --resume {run_dir}",
            stop.signum or 0,
        )

    flags = StepFlags(device, lag=FLAG_LAG)  # drained at the end of every epoch
    show_progress = sys.stderr.isatty() and world.is_main
    epoch = progress.epoch
    for epoch in range(progress.epoch, config.epochs + 1):
        epoch_start = time.perf_counter()
        first = epoch == progress.epoch
        # A resumed epoch starts from the sums saved by rank 0 (the other ranks add zero).
        partial = progress.partial if first and world.is_main else NO_PARTIAL_EPOCH
        totals, stopped_at = train_epoch(parts, config, epoch, progress.step if first else 0,
                                         partial, flags, stop, device, show_progress)
        if stopped_at is not None:
            if world.is_main:
                weights = weights_payload(model, config, splits, epoch - 1, None)
                save_last(run_dir, parts, progress, (epoch, stopped_at), totals, weights)
            distributed.barrier()  # no rank exits before rank 0 has saved
            raise interrupted(epoch, stopped_at)

        scores = validate(parts, config, splits, device, amp_dtype, world)
        row = {
            "epoch": epoch,
            # the rate of the epoch's last step
            "lr": parts.step.scheduler.base_lrs[0] * parts.lr_at(epoch * steps_per_epoch - 1),
            "train_loss": totals["loss_sum"] / totals["seen"],
            "train_acc": 100.0 * totals["correct"] / totals["seen"],
            **scores,
            "seconds": time.perf_counter() - epoch_start,
        }
        progress.history.append(row)
        improved = progress.early_stopping.update(epoch, row[select_key])
        if world.is_main:
            payload = weights_payload(model, config, splits, epoch, row["val_acc"])
            if improved:
                save(payload if select == "model" else weights_payload(
                    parts.ema.module, config, splits, epoch, row[select_key]),
                    run_dir / "best.pt")
            save_last(run_dir, parts, progress, (epoch + 1, 0), NO_PARTIAL_EPOCH, payload)
            write_metrics(run_dir, progress.history)
            if board is not None:
                board.epoch(row)
        log.info(epoch_line(row, config.epochs, improved))
        if on_epoch is not None and world.is_main:
            on_epoch(epoch, dict(row))

        # A stop after the last epoch lets the run finish: a last.pt past its end cannot be
        # resumed.
        last = epoch == config.epochs or progress.early_stopping.should_stop
        stop_now = torch.tensor(float(stop.signum is not None), device=device)
        if not last and distributed.all_reduce(stop_now, "max") > 0:
            distributed.barrier()
            raise interrupted(epoch + 1, 0)
        if progress.early_stopping.should_stop:
            log.info(f"early stop: no better validation accuracy in {config.patience} epochs")
            break

    result = finish(config, splits, model, device, precision, run_dir, progress, epoch, select,
                    world, teacher)
    if board is not None:
        board.finish(flat_settings(config), asdict(result))
        board.close()
    return result


def describe_run(config: Config, splits: Splits, model: nn.Module, device: torch.device,
                 precision: Precision, world: World, run_dir: Path) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    optim, mix = config.optim, config.mix
    mixing = (f"mixup alpha {mix.mixup_alpha:g}, CutMix alpha {mix.cutmix_alpha:g} "
              f"(p {mix.prob:g}, switch {mix.switch_prob:g})"
              if mix.mixup_alpha or mix.cutmix_alpha else "no mixup/CutMix")
    ema = f"EMA decay {config.ema.decay:g}" if config.ema.enabled else "no EMA"
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
        f"lr {optim.lr:g}, {optim.schedule} schedule, {mixing}, {ema}{distilled}; the best "
        f"checkpoint is chosen on the validation accuracy of the {chosen}"
    )


def finish(config: Config, splits: Splits, model: nn.Module, device: torch.device,
           precision: Precision, run_dir: Path, progress: Progress, epochs_run: int,
           selected: str, world: World, teacher: Teacher | None = None) -> FitResult:
    """Test best.pt, write result.json (rank 0) and return the result."""
    amp_dtype = precision.dtype
    train_seconds = progress.seconds()
    if not distributed.same_on_all_ranks(list(model.state_dict().values())):
        raise TrainingFailed("the ranks ended with different weights; this is a bug in the "
                             "distributed setup, please report it with the command line")
    early_stopping = progress.early_stopping
    test_acc, test_per_class, test_confusion = None, None, None
    if splits.test is not None:
        distributed.barrier()  # best.pt is complete before any rank reads it
        best = checkpoint.load(run_dir / "best.pt")
        model.load_state_dict(best["model"])
        test = evaluate(model, splits.test, splits.mean, splits.std, device,
                        amp_dtype=amp_dtype, world=world, flip=config.tta_flip,
                        translate=config.tta_translate)
        test_acc = test.acc
        test_per_class = [None if np.isnan(a) else a for a in test.per_class_acc]
        test_confusion = test.confusion.tolist()
        log.info(f"test accuracy of the best checkpoint ({selected} weights, epoch "
                 f"{early_stopping.best_epoch}): {test_acc:.2f}%")

    result = FitResult(
        run_dir=str(run_dir),
        best_val_acc=early_stopping.best,
        best_epoch=early_stopping.best_epoch,
        selected=selected,
        test_acc=test_acc,
        epochs_run=epochs_run,
        stopped_early=early_stopping.should_stop,
        train_seconds=train_seconds,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        world_size=world.size,
        torch_version=torch.__version__,
        classes=list(splits.classes),
        test_per_class_acc=test_per_class,
        test_confusion=test_confusion,
        data={
            "train_images": len(splits.train.labels),
            "val_images": len(splits.val.labels),
            "test_images": len(splits.test.labels) if splits.test is not None else 0,
            "mean": list(splits.mean),
            "std": list(splits.std),
        },
        teacher=teacher.summary() if teacher is not None else None,
        precision=precision.name,
        precision_reason=precision.reason,
        threads=torch.get_num_threads(),
    )
    if world.is_main:
        text = json.dumps(asdict(result), indent=2) + "\n"
        checkpoint.write_atomic(run_dir / "result.json", lambda f: f.write(text.encode()))
    log.info(f"best validation accuracy {result.best_val_acc:.2f}% ({selected} weights) at "
             f"epoch {result.best_epoch}; {train_seconds:.1f}s; results in {run_dir}")
    return result
