"""How long a run will take, told at its start: a CPU run that will take hours says so after
its first steps, and names the recipe that trains a model in minutes.

The estimate times the steps after the first few (which allocate and pick kernels) and
multiplies by the steps left; validation is not counted, so it errs short.
"""

from __future__ import annotations

import logging
import time

SKIPPED_STEPS = 2  # the first steps allocate memory and choose kernels
TIMED_STEPS = 5  # then at least these many are timed ...
TIMED_SECONDS = 20.0  # ... or fewer, once they took this long
LONG_RUN_SECONDS = 3600.0  # a CPU run longer than this is worth a word at its start
FAST_PRESET = "airbench"


class Pace:
    """Call `step()` after each training step; logs one warning when the run is long."""

    def __init__(self, steps_left: int, device_type: str, preset: str,
                 log: logging.Logger) -> None:
        self.steps_left, self.device_type, self.preset, self.log = steps_left, device_type, \
            preset, log
        self.count, self.started, self.done = 0, 0.0, device_type != "cpu"

    def step(self) -> None:
        if self.done:
            return
        self.count += 1
        if self.count == SKIPPED_STEPS:
            self.started = time.perf_counter()
            return
        timed = self.count - SKIPPED_STEPS
        elapsed = time.perf_counter() - self.started
        if timed < 1 or (timed < TIMED_STEPS and elapsed < TIMED_SECONDS):
            return
        self.done = True
        estimate = elapsed / timed * (self.steps_left - self.count)
        if estimate > LONG_RUN_SECONDS:
            self.log.warning(long_run_message(estimate, elapsed / timed, self.preset))


def long_run_message(seconds: float, step_seconds: float, preset: str) -> str:
    hours = seconds / 3600
    hint = ("" if preset == FAST_PRESET else
            f"; for a trained model in minutes on a CPU use --preset {FAST_PRESET} "
            "(BENCHMARKS.md), or fewer --epochs / a smaller --set model.width")
    return (f"at {step_seconds:.2f} s a step this run needs about {hours:.1f} h of training on "
            f"this CPU (validation not counted){hint}")
