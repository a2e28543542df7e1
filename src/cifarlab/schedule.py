"""The learning-rate schedule, a pure function of the optimizer step."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based).

    Linear warm-up from 1/warmup_steps to 1 over the first `warmup_steps` steps, then
    either constant or cosine annealing that reaches 0 after `total_steps` steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
