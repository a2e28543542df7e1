"""Where a run stands between its steps: the best validation accuracy so far and early
stopping, the history of epochs, the position in the epoch and the training time so far.
last.pt saves it (rundir.save_last) and a resumed run takes it back (rundir.restore)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# An epoch's running sums before its first step (last.pt keeps them for an epoch cut short).
NO_PARTIAL_EPOCH = {"loss_sum": 0.0, "correct": 0, "seen": 0}


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
