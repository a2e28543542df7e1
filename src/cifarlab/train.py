"""`fit(config)`: one training run, top to bottom, into its run folder.

A run can stop at any instant and go on exactly where it was: `last.pt` holds everything
the next step depends on (weights, optimizer, schedule, loss scale, early stopping, the
history, RNG states, and the position in the epoch: the loader's order and augmentation are
functions of (seed, epoch, position), see data/loader.py).
"""

from __future__ import annotations

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
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cifarlab import checkpoint, distributed, memory
from cifarlab.config import Config
from cifarlab.data.cpu_augment import train_transform
from cifarlab.data.loader import EpochBatchSampler, build_train_loader
from cifarlab.data.resident import ResidentLoader, build_resident_loader
from cifarlab.data.splits import Splits, prepare_splits
from cifarlab.distributed import World
from cifarlab.errors import TrainingFailed, TrainingInterrupted, UserError
from cifarlab.evaluate import evaluate
from cifarlab.interrupt import StopRequest, heartbeat
from cifarlab.models import create_model, model_args
from cifarlab.report import write_report
from cifarlab.schedule import lr_factor
from cifarlab.step import Flags, StepFlags, TrainStep, check_compile, compiled, memory_format

log = logging.getLogger("cifarlab")

METRICS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")
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


def existing_ancestor(path: Path) -> Path:
    """`path` itself, or its nearest parent that exists (where it would be created)."""
    while not path.exists():
        path = path.parent
    return path


def check_run_dir(run_dir: Path) -> None:
    """Refuse a used run folder or an unwritable place before any work is done."""
    if run_dir.exists() and any(run_dir.iterdir()):
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
    if args != wanted:
        raise UserError(f"--resume {run_dir}: last.pt holds {_describe(args)}, the config asks "
                        f"for {_describe(wanted)}")
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
    arch = [f"{k} {v}" for k, v in args.items() if k not in ("name", "num_classes")]
    return " ".join([args["name"], *arch])


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
    if kind == "auto":
        kind = "resident" if device.type == "cuda" else "torchvision"
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
        "model_args": model_args(config.model.name, len(splits.classes), config.model.width),
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
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(METRICS)
    for row in history:
        writer.writerow([row["epoch"], *(f"{row[k]:.6g}" for k in METRICS[1:])])
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


def fit(config: Config, *, resume: str | Path | None = None) -> FitResult:
    """Train `config` into a new run folder, or continue the run folder `resume`.

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
    if config.batch_size % world.size:
        raise UserError(f"batch_size {config.batch_size} is the global batch and must divide "
                        f"evenly over {world.size} processes; change --batch-size")
    try:
        return _fit(config, resume, device, world)
    finally:
        distributed.shutdown()


def _fit(config: Config, resume: str | Path | None, device: torch.device, world: World
         ) -> FitResult:
    amp_dtype = resolve_amp(config.amp, device)
    run_dir = Path(resume) if resume else distributed.broadcast(run_dir_for(config))
    if resume is None and distributed.restart_count() > 0 and (run_dir / "last.pt").exists():
        resume = run_dir  # torchrun restarted the workers: go on from the last checkpoint
    state = None
    if resume is None:
        check_run_dir(run_dir)
    else:
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
    # Before the model is built: a model too large for the memory is refused, not allocated.
    per_rank = -(-len(splits.train.labels) // world.size)
    memory.check_fits(config.model.name, len(splits.classes), config.model.width,
                      min(config.batch_size // world.size, per_rank), device)
    seed_everything(config.seed)
    model = create_model(**model_args(config.model.name, len(splits.classes), config.model.width))
    check_disk_space(run_dir, model)
    distributed.barrier()  # every rank has checked the run folder before rank 0 creates it

    file_log = None
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
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
            result = _train(config, splits, model, device, amp_dtype, run_dir, state, stop,
                            world)
            if world.is_main:
                log.info(f"report: {write_report(run_dir)}")
        return result
    finally:
        if file_log is not None:
            log.removeHandler(file_log)
            file_log.close()
        if config.deterministic:
            set_deterministic(False)


def _train(
    config: Config,
    splits: Splits,
    model: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    run_dir: Path,
    state: dict[str, Any] | None,
    stop: StopRequest,
    world: World,
) -> FitResult:
    set_deterministic(config.deterministic)
    if config.sync_batchnorm and world.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    layout = memory_format(device, model)  # on the CPU, NCHW where oneDNN would fail (step.py)
    model = model.to(device, memory_format=layout)
    # `model` is what is evaluated and saved; `train_model` what steps (DDP averages the
    # gradients over the ranks during backward).
    train_model = model
    if world.distributed:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.optim.lr,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
        nesterov=config.optim.nesterov,
        fused=device.type == "cuda",  # one kernel for all parameters instead of one each
    )
    loader, sampler = make_loader(config, splits, device, world)
    steps_per_epoch = len(loader)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.optim.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps, config.optim.schedule)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    early_stopping = EarlyStopping(config.patience)
    history: list[dict[str, float]] = []
    start_epoch, start_step = 1, 0  # the next step to run
    partial = NO_PARTIAL_EPOCH  # of an epoch stopped midway
    earlier_seconds = 0.0  # training time before this process took over
    if state is not None:
        model.load_state_dict(state["model"])
        ts = state["train_state"]
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        # The saved state carries the old hyperparameters; changes allowed on resume win.
        scheduler.base_lrs = [config.optim.lr]
        for group in optimizer.param_groups:
            group.update(initial_lr=config.optim.lr, momentum=config.optim.momentum,
                         weight_decay=config.optim.weight_decay, nesterov=config.optim.nesterov,
                         lr=config.optim.lr * lr_at(scheduler.last_epoch))
        scaler.load_state_dict(ts["scaler"])
        early_stopping = EarlyStopping(**ts["early_stopping"])
        early_stopping.patience = config.patience
        history = ts["history"]
        (start_epoch, start_step), partial = ts["position"], ts["partial_epoch"]
        earlier_seconds = ts["train_seconds"]
        set_rng_states(ts["rng"])
        log.info(f"resuming {run_dir} at epoch {start_epoch}, step {start_step}")

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        f"run {run_dir}: {config.model.name} width {config.model.width} ({n_params:,} parameters)"
        f" on {world.size} x {device.type}, amp {amp_dtype or 'off'}; "
        f"{len(splits.train.labels):,} train / {len(splits.val.labels):,} val / "
        f"{len(splits.test.labels) if splits.test else 0:,} test images, "
        f"{len(splits.classes)} classes"
    )
    process_start = time.perf_counter()

    def save_last(epoch: int, step: int, partial: dict[str, float], payload: dict) -> None:
        payload["train_state"] = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "early_stopping": asdict(early_stopping),
            "history": history,
            "position": [epoch, step],
            "partial_epoch": partial,
            "train_seconds": earlier_seconds + time.perf_counter() - process_start,
            "rng": rng_states(),
        }
        save(payload, run_dir / "last.pt")

    def interrupted(epoch: int, step: int) -> TrainingInterrupted:
        return TrainingInterrupted(
            f"stopped by {stop.name} at epoch {epoch}, step {step}; progress is saved in "
            f"{run_dir / 'last.pt'}; continue with: cifarlab train --resume {run_dir}",
            stop.signum or 0,
        )

    def sums(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> dict[str, float]:
        """The epoch's running sums, added up over the ranks."""
        totals = distributed.all_reduce(torch.stack([loss_sum, correct.double(), torch.tensor(
            float(seen), dtype=torch.float64, device=device)])).tolist()
        return {"loss_sum": totals[0], "correct": int(totals[1]), "seen": int(totals[2])}

    show_progress = sys.stderr.isatty() and world.is_main
    train_step = TrainStep(compiled(train_model, config.compile, device), criterion, optimizer,
                           scaler, scheduler, amp_dtype)
    flags = StepFlags(device, lag=FLAG_LAG)  # drained at the end of every epoch
    epoch = start_epoch
    for epoch in range(start_epoch, config.epochs + 1):
        epoch_start = time.perf_counter()
        step = start_step if epoch == start_epoch else 0
        sampler.set_epoch(epoch, step)
        train_model.train()
        # Running sums stay on the device so that no step waits for the host; a resumed
        # epoch starts from the totals saved by rank 0 (the other ranks add zero).
        resumed = partial if epoch == start_epoch and world.is_main else NO_PARTIAL_EPOCH
        loss_sum = torch.tensor(resumed["loss_sum"], dtype=torch.float64, device=device)
        correct = torch.tensor(resumed["correct"], dtype=torch.int64, device=device)
        seen = resumed["seen"]
        for x, y in tqdm(loader, desc=f"epoch {epoch}", initial=step, total=steps_per_epoch,
                         leave=False, disable=not show_progress):
            if check_flags(flags.ready(), epoch, config):
                # Stop here, after the steps already queued, once none of them went NaN.
                check_flags(flags.drain(), epoch, config)
                totals = sums(loss_sum, correct, seen)
                if world.is_main:
                    weights = weights_payload(model, config, splits, epoch - 1, None)
                    save_last(epoch, step, totals, weights)
                distributed.barrier()  # no rank exits before rank 0 has saved
                raise interrupted(epoch, step)
            x = x.to(device, non_blocking=True, memory_format=layout)
            y = y.to(device, non_blocking=True)
            loss, logits = train_step(x, y)
            loss_sum += loss.double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            step += 1
            flags.record(step, loss, stop.signum is not None)
            heartbeat()
        check_flags(flags.drain(), epoch, config)
        check_loss_scale(scaler, epoch)

        totals = sums(loss_sum, correct, seen)
        distributed.sync_buffers(model)
        val = evaluate(model, splits.val, splits.mean, splits.std, device,
                       amp_dtype=amp_dtype, criterion=criterion, world=world,
                       flip=config.tta_flip)
        history.append({
            "epoch": epoch,
            "lr": scheduler.base_lrs[0] * lr_at(epoch * steps_per_epoch - 1),  # epoch's last step
            "train_loss": totals["loss_sum"] / totals["seen"],
            "train_acc": 100.0 * totals["correct"] / totals["seen"],
            "val_loss": val.loss,
            "val_acc": val.acc,
            "seconds": time.perf_counter() - epoch_start,
        })
        improved = early_stopping.update(epoch, val.acc)
        if world.is_main:
            payload = weights_payload(model, config, splits, epoch, val.acc)
            if improved:
                save(payload, run_dir / "best.pt")
            save_last(epoch + 1, 0, NO_PARTIAL_EPOCH, payload)
            write_metrics(run_dir, history)
        row = history[-1]
        log.info(
            f"epoch {epoch:>3}/{config.epochs}  lr {row['lr']:.4f}  "
            f"train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}%  "
            f"{row['seconds']:.1f}s{'  *best' if improved else ''}"
        )
        stop_now = torch.tensor(float(stop.signum is not None), device=device)
        if distributed.all_reduce(stop_now, "max") > 0:
            distributed.barrier()
            raise interrupted(epoch + 1, 0)
        if early_stopping.should_stop:
            log.info(f"early stop: no better validation accuracy in {config.patience} epochs")
            break
    train_seconds = earlier_seconds + time.perf_counter() - process_start
    if not distributed.same_on_all_ranks(list(model.state_dict().values())):
        raise TrainingFailed("the ranks ended with different weights; this is a bug in the "
                             "distributed setup, please report it with the command line")

    test_acc, test_per_class, test_confusion = None, None, None
    if splits.test is not None:
        distributed.barrier()  # best.pt is complete before any rank reads it
        best = checkpoint.load(run_dir / "best.pt")
        model.load_state_dict(best["model"])
        test = evaluate(model, splits.test, splits.mean, splits.std, device,
                        amp_dtype=amp_dtype, world=world, flip=config.tta_flip)
        test_acc = test.acc
        test_per_class = [None if np.isnan(a) else a for a in test.per_class_acc]
        test_confusion = test.confusion.tolist()
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
    )
    if world.is_main:
        text = json.dumps(asdict(result), indent=2) + "\n"
        checkpoint.write_atomic(run_dir / "result.json", lambda f: f.write(text.encode()))
    log.info(f"best validation accuracy {result.best_val_acc:.2f}% at epoch {result.best_epoch}; "
             f"{train_seconds:.1f}s; results in {run_dir}")
    return result
