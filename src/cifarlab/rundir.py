"""A run folder as training writes it: its name, the lock of the process that trains it,
the checks before anything is written (a used folder, an unwritable place, the disk space),
run ids, the checkpoint payloads (best.pt; last.pt with the whole training state, read back
for an exact resume) and metrics.csv. runs.py reads finished folders back for reports."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from cifarlab import checkpoint, locks
from cifarlab.config import Config
from cifarlab.data.splits import Splits
from cifarlab.devices import Precision
from cifarlab.errors import TrainingFailed, UserError
from cifarlab.models import LAYERS, architecture, model_args
from cifarlab.seeding import rng_states, set_rng_states
from cifarlab.training.optim import set_hyperparameters
from cifarlab.training.progress import EarlyStopping, Progress

if TYPE_CHECKING:
    from cifarlab.training.parts import Parts

log = logging.getLogger("cifarlab")

METRICS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")
EMA_METRICS = ("ema_val_loss", "ema_val_acc")  # before `seconds`, when EMA is on


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


def open_run_folder(run_dir: Path, config: Config, held: contextlib.ExitStack, new: bool
                    ) -> None:
    """Rank 0, before the first step: the folder created and held (a `new` one checked again
    once held: a process that started with this one may have taken it), the files of a
    finished run removed (a resumed run is unfinished again), leftovers of an interrupted save
    removed, config.yaml written and a run id given where there is none (a new run, or one
    from before run ids)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if new:
        held.enter_context(hold_run_folder(run_dir))
        check_run_dir(run_dir)
    for finished in ("result.json", "report.md", "report.html"):
        (run_dir / finished).unlink(missing_ok=True)
    for leftover in checkpoint.remove_leftovers(run_dir):
        log.info(f"removed {leftover.name}, left by an interrupted save")
    checkpoint.write_atomic(run_dir / "config.yaml", lambda f: f.write(config.to_yaml().encode()))
    if checkpoint.read_run_id(run_dir) is None:
        checkpoint.write_run_id(run_dir, checkpoint.new_run_id())


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


def restore(parts: Parts, config: Config, state: dict[str, Any]) -> Progress:
    """Load last.pt's weights, optimizer, schedule, loss scale, EMA, lookahead and RNG
    states; the progress it saved."""
    ts = state["train_state"]
    parts.model.load_state_dict(state["model"])
    optimizer, scheduler = parts.step.optimizer, parts.step.scheduler
    optimizer.load_state_dict(ts["optimizer"])
    scheduler.load_state_dict(ts["scheduler"])
    set_hyperparameters(optimizer, scheduler, config.optim)
    parts.step.scaler.load_state_dict(ts["scaler"])
    if parts.ema is not None:  # EMA switched on at resume: it starts from the weights
        parts.ema.load_state_dict(ts.get("ema", {"weights": state["model"], "updates": 0}))
    if parts.step.lookahead is not None:  # switched on at resume: it starts from the weights
        parts.step.lookahead.load_state_dict(ts.get("lookahead", {"slow": [
            v for v in state["model"].values() if v.is_floating_point()]}))
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
        "precision": Precision(parts.step.amp_dtype, "").name,  # a resume keeps it
    }
    if parts.ema is not None:
        payload["train_state"]["ema"] = parts.ema.state_dict()
    if parts.step.lookahead is not None:
        payload["train_state"]["lookahead"] = parts.step.lookahead.state_dict()
    if parts.teacher is not None:  # who it is, so that --resume can check; not its weights
        payload["train_state"]["teacher"] = parts.teacher.identity
    save(payload, run_dir / "last.pt")
