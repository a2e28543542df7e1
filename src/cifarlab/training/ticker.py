"""Progress inside an epoch when nobody watches a terminal: with stderr sent to a file (nohup,
CI, a job scheduler) tqdm's bar is off, so a plain line every EVERY_SECONDS says where the
epoch is, how fast it goes and when it will end. The lines go to stderr only, not to
train.log, which keeps one line per epoch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

EVERY_SECONDS = 30.0


class Ticker:
    """Call `step(done)` after each step of an epoch; prints a line when EVERY_SECONDS (or
    `every`) have passed since the last one, or since the epoch started."""

    def __init__(self, epoch: int, epochs: int, total_steps: int, first_step: int = 0, *,
                 every: float | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.epoch, self.epochs, self.total, self.first = epoch, epochs, total_steps, first_step
        self.every = EVERY_SECONDS if every is None else every
        self.stream, self.clock = stream, clock
        self.started = self.last = clock()

    def step(self, done: int) -> None:
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        step_seconds = (now - self.started) / max(done - self.first, 1)  # this process's
        left = (self.total - done) * step_seconds
        print(f"epoch {self.epoch}/{self.epochs}: step {done}/{self.total} "
              f"({100 * done / self.total:.0f} %), {step_seconds:.2f} s a step, about "
              f"{_duration(left)} left in this epoch", file=self.stream or sys.stderr,
              flush=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"
