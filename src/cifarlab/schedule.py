"""The learning-rate schedule, a pure function of the optimizer step."""

from __future__ import annotations

import math
from collections.abc import Sequence


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str,
              milestones: Sequence[float] = (), gamma: float = 0.1) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based).

    Every schedule starts with the same linear warm-up from 1/warmup_steps to 1 over the
    first `warmup_steps` steps; then
      cosine     cosine annealing that reaches 0 after `total_steps` steps;
      onecycle   a straight line down to 0 after `total_steps` steps: with the warm-up as its
                 rising half, the triangular one-cycle of Smith and Topin;
      multistep  `gamma` to the power of the number of `milestones` passed; a milestone is a
                 fraction of the run (0.5: step round(0.5 * total_steps)), counted from its
                 first step, warm-up included;
      constant   1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        return gamma ** sum(step >= round(m * total_steps) for m in milestones)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "onecycle":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
