"""Lookahead (Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back") with
the schedule of the airbench paper (Jordan 2024): every `every` optimizer steps a slow copy
of the weights moves towards the model's, slow += (1 - decay) * (model - slow), and the
model goes on from the slow copy. The decay grows with the run, decay(t) = decay_end *
(t / T)^3 after t of the run's T steps, so the early steps are plain SGD and the late ones
are averaged; after the run's last step the model takes the slow weights.

Written here rather than taken from a library: torch has no lookahead, and timm's (not a
dependency) pulls with a fixed rate, not this schedule. As in the paper, BatchNorm's running
statistics are averaged with the weights; integer buffers (the batch counter) stay the
model's. The update is two foreach ops on the device with a decay computed on the host from
the step count: no host synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PAPER_DECAY = 0.95**5  # airbench's decay at the end of the run, for a pull every 5 steps


def lookahead_decay(decay_end: float, step: int, total_steps: int) -> float:
    """The decay of the pull after `step` of `total_steps` steps: decay_end * (t / T)^3."""
    return decay_end * (min(step, total_steps) / total_steps) ** 3


class Lookahead:
    """The slow weights of `model`; `update(step)` after each optimizer step (1-based count
    of the run's steps) pulls them every `every` steps and resets the model to them."""

    def __init__(self, model: nn.Module, every: int, decay_end: float, total_steps: int) -> None:
        if every < 1 or total_steps < 1:
            raise ValueError(f"lookahead needs every >= 1 and total_steps >= 1, got {every} "
                             f"and {total_steps}")
        self.every, self.decay_end, self.total_steps = every, decay_end, total_steps
        self._fast = [v for v in model.state_dict().values() if v.is_floating_point()]
        self._slow = [v.detach().clone() for v in self._fast]

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.every == 0:
            decay = lookahead_decay(self.decay_end, step, self.total_steps)
            torch._foreach_lerp_(self._slow, self._fast, 1.0 - decay)  # slow -> model
            torch._foreach_copy_(self._fast, self._slow)  # the model goes on from slow
        elif step == self.total_steps:  # the run ends on the slow weights
            torch._foreach_copy_(self._fast, self._slow)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors: loads with weights_only=True."""
        return {"slow": [v.detach().cpu() for v in self._slow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch._foreach_copy_(self._slow, list(state["slow"]))  # last.pt of this very model
