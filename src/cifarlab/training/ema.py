"""An exponential moving average (EMA) of a model's weights, updated after every optimizer
step (as timm's utils/model_ema.py).

Choices:
- warm-up: the decay after n updates is min(decay, (1 + n) / (10 + n)) (TensorFlow's
  ExponentialMovingAverage with num_updates): the first updates follow the weights closely,
  so the average does not keep the random initialisation for thousands of steps, and no
  setting beyond `decay` is needed. With decay 0.999 the full decay is reached after about
  9,000 steps;
- buffers: floating-point buffers (BatchNorm's running mean and variance) are averaged like
  the weights, as timm does by default, so that the statistics belong to averaged weights
  rather than to the last step's; integer buffers (BatchNorm's batch counter) are copied;
- the update is a single foreach lerp on the device with a decay computed on the host from
  the update count: no host synchronisation per step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def ema_decay(decay: float, updates: int) -> float:
    """The decay of update number `updates` (1-based): min(decay, (1 + n) / (10 + n))."""
    return min(decay, (1 + updates) / (10 + updates))


class ModelEma:
    """A copy of `model` whose weights follow the model's as an exponential moving average.

    `module` is an ordinary model in eval mode, evaluated and saved like the model itself;
    `update()` folds in the model's current weights (the model is the one the optimizer
    steps; the copy keeps references to its tensors)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        ours, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in ours.items() if v.is_floating_point()]
        self._averaged = ([ours[k] for k in floats], [theirs[k] for k in floats])
        self._copied = [(ours[k], theirs[k]) for k in ours if k not in floats]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        weight = 1.0 - ema_decay(self.decay, self.updates)
        torch._foreach_lerp_(*self._averaged, weight)  # ema += weight * (model - ema)
        for ours, theirs in self._copied:
            ours.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints: loads with weights_only=True."""
        weights = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        return {"weights": weights, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = state["updates"]
