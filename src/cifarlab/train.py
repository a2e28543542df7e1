"""`fit(config)`: one training run, top to bottom, into its run folder.

A run can stop at any instant and go on exactly where it was: `last.pt` holds everything
the next step depends on (weights, optimizer, schedule, loss scale, early stopping, the
history, RNG states, and the position in the epoch: the loader's order and augmentation are
functions of (seed, epoch, position), see data/loader.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cifarlab import checkpoint, distributed, memory
from cifarlab.config import Config, flat_settings
from cifarlab.data.splits import Splits, prepare_splits
from cifarlab.devices import (
    Precision,
    check_amp,
    check_compile,
    choose,
    memory_format,
    resolve_device,
)
from cifarlab.distributed import World
from cifarlab.errors import TrainingFailed, TrainingInterrupted, UserError
from cifarlab.evaluate import evaluate
from cifarlab.interrupt import StopRequest, heartbeat
from cifarlab.models import create_model, model_args
from cifarlab.report import write_report
from cifarlab.rundir import (
    check_disk_space,
    check_run_dir,
    hold_run_folder,
    load_resume_state,
    open_run_folder,
    restore,
    run_dir_for,
    save,
    save_last,
    weights_payload,
    write_metrics,
)
from cifarlab.seeding import seed_everything, set_deterministic
from cifarlab.step import FLAG_LAG, StepFlags, check_flags, check_loss_scale
from cifarlab.training.board import Board, check_available
from cifarlab.training.distill import Teacher, describe, load_teacher
from cifarlab.training.optim import schedule_warning
from cifarlab.training.pace import Pace
from cifarlab.training.parts import Parts, build_model, build_parts, describe_run
from cifarlab.training.progress import NO_PARTIAL_EPOCH, EarlyStopping, Progress
from cifarlab.training.ticker import Ticker

log = logging.getLogger("cifarlab")


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
    precision_reason: str = ""  # why (devices.choose)
    threads: int = 0  # torch's intra-op threads per process


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
    model = build_model(config, splits, state, initial, log)
    # Measured on rank 0 alone (on the CPU), so that every rank trains in the same precision.
    precision = distributed.broadcast(choose(
        config.amp, device, model, config.batch_size // world.size,
        memory_format(device, model), len(splits.classes),
        started=state["train_state"].get("precision") if state else None)
        if world.is_main else None)
    check_disk_space(run_dir, model)
    distributed.barrier()  # every rank has checked the run folder before rank 0 creates it

    file_log = None
    if world.is_main:
        open_run_folder(run_dir, config, held, new=resume is None)
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


def epoch_sums(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> dict[str, float]:
    """An epoch's running sums, added up over the ranks."""
    totals = distributed.all_reduce(torch.stack([loss_sum, correct.double(), torch.tensor(
        float(seen), dtype=torch.float64, device=loss_sum.device)])).tolist()
    return {"loss_sum": totals[0], "correct": int(totals[1]), "seen": int(totals[2])}


def train_epoch(parts: Parts, config: Config, epoch: int, step: int, partial: dict[str, float],
                flags: StepFlags, stop: StopRequest, device: torch.device,
                display: str | None) -> tuple[dict[str, float], int | None]:
    """Train `epoch` from `step` (0-based) on; the epoch's sums (`partial` included), and
    the step a stop was requested at (None when the epoch ran to its end)."""
    parts.sampler.set_epoch(epoch, step)
    parts.train_model.train()
    # Running sums stay on the device so that no step waits for the host.
    loss_sum = torch.tensor(partial["loss_sum"], dtype=torch.float64, device=device)
    correct = torch.tensor(partial["correct"], dtype=torch.int64, device=device)
    seen = partial["seen"]
    # Rank 0 shows the epoch's progress: tqdm's bar on a terminal, a line now and then
    # elsewhere (a log file, a job scheduler).
    ticker = Ticker(epoch, config.epochs, len(parts.loader), step) if display == "lines" \
        else None
    for x, y in tqdm(parts.loader, desc=f"epoch {epoch}", initial=step,
                     total=len(parts.loader), leave=False, disable=display != "bar"):
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
        if ticker is not None:
            ticker.step(step)
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
    if config.compile != "off":
        log.info(f"torch.compile ({config.compile}) compiles the step during the first steps "
                 "of epoch 1 (and again for an epoch's last, smaller batch): they are slow")
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
    display = ("bar" if sys.stderr.isatty() else "lines") if world.is_main else None
    epoch = progress.epoch
    for epoch in range(progress.epoch, config.epochs + 1):
        epoch_start = time.perf_counter()
        first = epoch == progress.epoch
        # A resumed epoch starts from the sums saved by rank 0 (the other ranks add zero).
        partial = progress.partial if first and world.is_main else NO_PARTIAL_EPOCH
        totals, stopped_at = train_epoch(parts, config, epoch, progress.step if first else 0,
                                         partial, flags, stop, device, display)
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
