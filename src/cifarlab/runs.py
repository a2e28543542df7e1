"""A run folder read back: its settings, its epoch history and, once finished, its result.

The one reader behind `plot`, `compare` and `report`. A run that is still training or was
interrupted has no result.json; its best epoch then comes from the history, chosen the way
training chooses it (the first epoch with the highest validation accuracy), and it has no
test accuracy.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarlab import config as cfg
from cifarlab.errors import UserError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
RESULT_FILE = "result.json"
# The keys of result.json (train.FitResult) that every cifarlab wrote; readers take the
# later additions (test_confusion, data) with .get().
RESULT_KEYS = ("best_val_acc", "best_epoch", "test_acc", "epochs_run", "stopped_early",
               "train_seconds", "device", "torch_version", "classes", "test_per_class_acc")


@dataclass(frozen=True)
class Epoch:
    """One row of metrics.csv (the columns are rundir.METRICS, in this order)."""

    epoch: int  # 1-based
    lr: float  # learning rate of the epoch's last optimizer step
    train_loss: float  # mean of the run's criterion (label smoothing included) while training
    train_acc: float  # percent, on the augmented training images (mixup/CutMix: dominant label)
    val_loss: float
    val_acc: float  # percent
    seconds: float  # wall time of the epoch, validation included


COLUMNS = tuple(f.name for f in dataclasses.fields(Epoch))


@dataclass
class Run:
    folder: Path
    label: str  # how figures and tables name the run: its folder name, unless ambiguous
    config: cfg.Config
    history: list[Epoch]  # at least one epoch
    result: dict[str, Any] | None  # result.json (see train.FitResult); None while unfinished

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def best(self) -> Epoch:
        """The epoch whose checkpoint is best.pt."""
        if self.result is not None:
            return next(e for e in self.history if e.epoch == self.result["best_epoch"])
        top = max(e.val_acc for e in self.history)
        return next(e for e in self.history if e.val_acc == top)

    @property
    def test_acc(self) -> float | None:
        """Percent, of best.pt on the test split; None without test data or result."""
        return None if self.result is None else self.result["test_acc"]

    @property
    def epochs_run(self) -> int:
        return self.history[-1].epoch

    @property
    def train_seconds(self) -> float:
        """Wall time of all epochs; for an unfinished run, of the epochs recorded so far."""
        if self.result is not None:
            return float(self.result["train_seconds"])
        return sum(e.seconds for e in self.history)

    @property
    def status(self) -> str:
        """finished, stopped early (by early stopping) or unfinished (no result.json)."""
        if self.result is None:
            return "unfinished"
        return "stopped early" if self.result["stopped_early"] else "finished"


def read_run(folder: str | Path, label: str | None = None) -> Run:
    """Read a run folder that `cifarlab train` wrote; UserError if it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run {folder}: no such folder; give a run folder that "
                        "`cifarlab train` wrote (runs/<name>)")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"run {folder}: no {CONFIG_FILE} there; give a run folder that "
                        "`cifarlab train` wrote (runs/<name>)")
    settings = cfg.load_yaml(config_path, where=str(config_path))
    try:
        config = cfg.from_dict(settings)
    except UserError as e:
        raise UserError(f"{config_path}: {e}") from None
    history = _read_history(folder / METRICS_FILE)
    result = _read_result(folder / RESULT_FILE)
    if result is not None and result["best_epoch"] not in {e.epoch for e in history}:
        raise UserError(f"{folder}: {RESULT_FILE} names best epoch {result['best_epoch']}, "
                        f"which {METRICS_FILE} does not hold; the run folder is damaged")
    return Run(folder, label or folder.resolve().name, config, history, result)


def read_runs(folders: Sequence[str | Path]) -> list[Run]:
    """Several runs, labelled by folder name, or by the path given where names repeat."""
    names = [Path(f).resolve().name for f in folders]
    return [read_run(f, name if names.count(name) == 1 else str(f))
            for f, name in zip(folders, names, strict=True)]


def _read_history(path: Path) -> list[Epoch]:
    if not path.is_file():
        raise UserError(f"run {path.parent}: no {METRICS_FILE} yet; its first epoch has not "
                        "finished (or it is not a cifarlab run folder)")
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read it ({e}); the run folder is damaged") from None
    if not rows:
        raise UserError(f"{path}: no epoch recorded yet; wait for the first epoch to finish")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)}; not a metrics.csv of cifarlab")
    history = []
    for line, row in enumerate(rows, start=2):
        try:
            history.append(Epoch(int(row["epoch"]), *(float(row[c]) for c in COLUMNS[1:])))
        except (TypeError, ValueError):
            raise UserError(f"{path}: line {line} is not a row of numbers; the file is "
                            "damaged") from None
    return history


def _read_result(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); the run folder is damaged") from None
    if not isinstance(result, dict):
        raise UserError(f"{path}: not a result of cifarlab (no mapping at the top level)")
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}; written by an older cifarlab? "
                        "evaluate best.pt with `cifarlab evaluate` instead")
    return result
